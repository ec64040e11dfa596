#!/usr/bin/env bash
# README command 1: the main job end to end on the embedded default (a tiny NVLM-D checkpoint
# that the project generates). Output goes to ${NVLM_DEMO_DIR:-demo_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
OUT=${NVLM_DEMO_DIR:-demo_out}
NB=".venv/bin/nvlm-build"
mkdir -p "$OUT"

echo "== 1. generate the embedded default checkpoint (trained on the tile task: docs/demo_model.md; --weights random for the seeded random one)"
$NB demo-checkpoint "$OUT/nvlm-d-demo" --force
# an image of the task it was trained on (drawn fresh from a seed it never saw): three cells, 1344x448
.venv/bin/python -c "import numpy as np, sys; from demo_model.task import random_scene
s = random_scene(np.random.default_rng(2026), (1344, 448)); s.image.save(sys.argv[1]); print('task image:', s.cells)" \
  "$OUT/tile_task.png"

echo "== 2. inspect it (architecture, parameters, shards, H100 memory plan)"
$NB inspect "$OUT/nvlm-d-demo"

echo "== 3. reference NVLM-D, greedy, text-only prompt"
$NB reference "$OUT/nvlm-d-demo" --prompt "Describe the image in detail." --max-new-tokens 12

echo "== 4. reference NVLM-D, greedy, one synthetic 448x448 tile"
$NB reference "$OUT/nvlm-d-demo" --prompt "<image>
What is shown in this picture?" --synthetic-tiles 1 --max-new-tokens 12

echo "== 5. reference NVLM-D on the bundled image: dynamic tiling (2x1 grid + thumbnail), tile tags, greedy"
$NB reference "$OUT/nvlm-d-demo" --prompt "<image>
What shapes are in this picture?" --image assets/demo_scene.png --max-new-tokens 12

TRAINED=0
.venv/bin/python -c "from runtime.core.demo_checkpoint import trained_available as t; raise SystemExit(not t())" && TRAINED=1
echo "== 5a. the embedded default's task accuracy on 100 held-out questions, and one question about the task image"
if [ $TRAINED = 1 ]; then
  $NB eval "$OUT/nvlm-d-demo" --n 100
  $NB reference "$OUT/nvlm-d-demo" --prompt "<image>
Which tile has the red shape?" --image "$OUT/tile_task.png" --max-new-tokens 4
  echo "   expected: tile 3"
else
  echo "   skipped: no trained weights are packaged yet, the default is random (docs/demo_model.md, issue 17)"
fi

echo "== 5b. NVLM-X and NVLM-H (the paper's cross-attention models; layout in docs/nvlm_xh_layout.md):"
echo "       their embedded defaults, inspected and answering about the same image through the reference"
for V in x h; do
  $NB demo-checkpoint "$OUT/nvlm-$V-demo" --variant $V --force
  $NB inspect "$OUT/nvlm-$V-demo"
  $NB reference "$OUT/nvlm-$V-demo" --prompt "<image>
What shapes are in this picture?" --image assets/demo_scene.png --max-new-tokens 12
done

echo "== 6. one command to a deployable build: nvlm-build engine (FP8 LLM + FP8 KV cache, fp16 vision ONNX)"
$NB engine "$OUT/nvlm-d-demo" -o "$OUT/build-fp8" --quant fp8 --kv-cache-dtype fp8 --calib-size 8 --force
.venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); print('fidelity passed:', r['passed']); [print(f\"  {c['component']:<7}{c['name']:<34} {c['value'] if c['value'] is None else round(c['value'], 5)}  (threshold {c['threshold']})\") for c in r['checks']]" "$OUT/build-fp8/reports/fidelity.json"

echo "== 7. serve the build on Triton (bundled CPU tritonserver, reference target), ask about the bundled image"
PORT=$(( 21000 + RANDOM % 2000 ))
.venv/bin/nvlm-serve "$OUT/build-fp8" --grpc-port $PORT --http-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
  --log-file "$OUT/tritonserver.log" > "$OUT/serve.out" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null' EXIT
for _ in $(seq 1 120); do grep -q "^serving" "$OUT/serve.out" 2>/dev/null && break; kill -0 $SERVE_PID || { cat "$OUT/serve.out"; exit 1; }; sleep 0.5; done
cat "$OUT/serve.out"
.venv/bin/nvlm-client --url 127.0.0.1:$PORT --prompt "<image>
What shapes are in this picture?" --image assets/demo_scene.png --max-tokens 12 --stream
if [ $TRAINED = 1 ]; then
  for Q in "What shape is in tile 2?|square" "Which tile has the red shape?|tile 3" "How many shapes are there?|3"; do
    echo "-- served: ${Q%%|*}  (expected: ${Q##*|})"
    .venv/bin/nvlm-client --url 127.0.0.1:$PORT --prompt "<image>
${Q%%|*}" --image "$OUT/tile_task.png" --max-tokens 4
  done
fi
kill $SERVE_PID; wait $SERVE_PID || true
trap - EXIT
echo "== server stopped; log in $OUT/tritonserver.log"
