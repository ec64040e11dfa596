#!/usr/bin/env bash
# README command 1: the main job end to end on the embedded default (a tiny NVLM-D checkpoint
# that the project generates). Output goes to ${NVLM_DEMO_DIR:-demo_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
OUT=${NVLM_DEMO_DIR:-demo_out}
NB=".venv/bin/nvlm-build"
mkdir -p "$OUT"

echo "== 1. generate the embedded default checkpoint"
$NB demo-checkpoint "$OUT/nvlm-d-demo" --force

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

echo "== 6. one command to a deployable build: nvlm-build engine (FP8 LLM + FP8 KV cache, fp16 vision ONNX)"
$NB engine "$OUT/nvlm-d-demo" -o "$OUT/build-fp8" --quant fp8 --kv-cache-dtype fp8 --calib-size 8 --force
.venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); print('fidelity passed:', r['passed']); [print(f\"  {c['component']:<7}{c['name']:<34} {c['value'] if c['value'] is None else round(c['value'], 5)}  (threshold {c['threshold']})\") for c in r['checks']]" "$OUT/build-fp8/reports/fidelity.json"
