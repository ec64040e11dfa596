#!/usr/bin/env bash
# What a refactor must not change, written to one folder so that two trees can be compared:
#   scripts/behaviour_snapshot.sh OUT        (in each tree; then: diff -r OUT_before/snapshot OUT_after/snapshot)
# - the build directories of the embedded default (bf16, fp8 + FP8 KV cache, int4_awq): sha256 of every file;
# - the answers (tokens, text, log-probs) of a fixed set of requests served by nvlm-serve from the fp8 build,
#   streamed and not, with stop / bad words, penalties and seeded sampling.
# Only the command-line tools are used, so the script runs unchanged on both sides of a module move.
# Timings (seconds, time to first token, chunk arrival times) and how a stream was cut into chunks are left out:
# they differ run to run.
# NVLM_SNAPSHOT_REUSE=1 keeps the builds already in OUT (their lists are rewritten), e.g. to redo the requests.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:?usage: scripts/behaviour_snapshot.sh OUT}")
mkdir -p "$OUT/snapshot"
NB=.venv/bin/nvlm-build
PY=.venv/bin/python

[ "${NVLM_SNAPSHOT_REUSE:-0}" = 1 ] && [ -d "$OUT/ckpt" ] || $NB demo-checkpoint "$OUT/ckpt" --force > /dev/null
$PY -c "import numpy as np, sys; from PIL import Image; rng = np.random.default_rng(2026)
Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)).save(sys.argv[1])" "$OUT/noise.png"
for spec in "bf16|--quant bf16" "fp8|--quant fp8 --kv-cache-dtype fp8 --calib-size 8" "int4_awq|--quant int4_awq --calib-size 8"; do
  name=${spec%%|*}
  if [ "${NVLM_SNAPSHOT_REUSE:-0}" != 1 ] || [ ! -f "$OUT/build-$name/manifest.json" ]; then
    # shellcheck disable=SC2086
    $NB engine "$OUT/ckpt" -o "$OUT/build-$name" ${spec##*|} --force > "$OUT/build-$name.log" 2>&1
  fi
  (cd "$OUT/build-$name" && find . -type f | LC_ALL=C sort | xargs sha256sum) > "$OUT/snapshot/build-$name.sha256"
done

PORT=$(( 23000 + RANDOM % 2000 ))
.venv/bin/nvlm-serve "$OUT/build-fp8" --grpc-port $PORT --http-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
  --log-file "$OUT/tritonserver.log" > "$OUT/serve.out" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null' EXIT
for _ in $(seq 1 240); do grep -q "^serving" "$OUT/serve.out" 2>/dev/null && break
  kill -0 $SERVE_PID || { cat "$OUT/serve.out"; exit 1; }; sleep 0.5; done
ask() {  # label, then nvlm-client arguments; a refused request is recorded with its error
  local label=$1; shift
  { .venv/bin/nvlm-client --url 127.0.0.1:$PORT --json "$@" 2>&1 || true; } | $PY -c "import json, sys
text = sys.stdin.read()
try:
    a = json.loads(text)
except ValueError:
    a = {'error': text.strip()}
for k in ('seconds', 'time_to_first_token', 'chunk_times', 'chunks'):  # chunking depends on load
    a.pop(k, None)
print(sys.argv[1], json.dumps(a, sort_keys=True))" "$label" >> "$OUT/snapshot/served.jsonl"
}
: > "$OUT/snapshot/served.jsonl"
IMG=assets/demo_scene.png
ask text         --prompt "Describe the image in detail." --max-tokens 12
ask text-stream  --prompt "Describe the image in detail." --max-tokens 12 --stream
ask image        --prompt "<image>
What shapes are in this picture?" --image $IMG --max-tokens 12
ask image-stream --prompt "<image>
What shapes are in this picture?" --image $IMG --max-tokens 12 --stream
ask noise-image  --prompt "<image> Which tile?" --image "$OUT/noise.png" --max-tokens 10
ask two-images   --prompt "<image> and <image>: which tile?" --image $IMG --image "$OUT/noise.png" --max-tokens 10
ask stop-bad     --prompt "<image>
Which tile has the red shape?" --image $IMG --max-tokens 10 --stop tile --bad-word the --stream
ask penalties    --prompt "Count: one two three" --max-tokens 16 --repetition-penalty 1.3 --presence-penalty 0.5 \
  --frequency-penalty 0.2
ask sampled      --prompt "<image>
How many shapes are there?" --image $IMG --max-tokens 12 --temperature 0.9 --top-k 20 --top-p 0.9 --seed 7 \
  --log-probs
ask sampled-stream --prompt "Say something." --max-tokens 12 --temperature 1.2 --top-k 0 --top-p 0.95 --seed 11 \
  --log-probs --stream
kill $SERVE_PID; wait $SERVE_PID 2>/dev/null || true
trap - EXIT
echo "snapshot in $OUT/snapshot: $(wc -l < "$OUT/snapshot/served.jsonl") served answers, $(cat "$OUT"/snapshot/build-*.sha256 | wc -l) build files"
