#!/usr/bin/env bash
# Opt-in cross-check of nvlm-bench against NVIDIA's aiperf on the same server and prompts.
#   benchmarks/aiperf_crosscheck.sh            (creates .aiperf-venv with `pip install aiperf`, ~1.1 GB, once)
# Builds the embedded default (reference target), serves it, runs aiperf over Triton's HTTP
# generate_stream endpoint (template endpoint, response_field text_output), then nvlm-bench over gRPC
# on exactly the prompts aiperf sent (its inputs.json), both at concurrency 1 with 16 output tokens
# forced by min_length, and prints both sets of figures side by side. The server is pinned to CPU 0
# and both clients to CPU 1 (taskset) when the machine has 2+ CPUs: aiperf runs several processes,
# and on a small machine they would otherwise starve the server while it is being measured.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
AIPERF_VENV=${AIPERF_VENV:-.aiperf-venv}
[ -x "$AIPERF_VENV/bin/aiperf" ] || { python3 -m venv "$AIPERF_VENV"; "$AIPERF_VENV/bin/pip" install -q aiperf; }
W=$(mktemp -d)
NB=.venv/bin/nvlm-build
$NB demo-checkpoint "$W/ckpt" >/dev/null
$NB engine "$W/ckpt" -o "$W/build" --quant bf16 --target reference --vision-dtype fp32 --json >/dev/null
PORT=$(( 26000 + RANDOM % 2000 ))
SRV=""; CLI=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then SRV="taskset -c 0"; CLI="taskset -c 1"; fi
$SRV .venv/bin/nvlm-serve "$W/build" --grpc-port $PORT --http-port $((PORT + 1)) --metrics-port $((PORT + 2)) > "$W/serve.out" 2>&1 &
PID=$!; trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
for _ in $(seq 1 120); do grep -q "^serving" "$W/serve.out" && break; sleep 0.5; done
printf '%s\n' '{"text_input": {{ text|tojson }}, "max_tokens": 16, "stream": true, "min_length": 16}' > "$W/template.jinja"
$CLI "$AIPERF_VENV/bin/aiperf" profile --model nvlm --url "http://127.0.0.1:$((PORT + 1))/v2/models/nvlm/generate_stream" \
  --endpoint-type template --extra-inputs "payload_template:$W/template.jinja" --extra-inputs response_field:text_output \
  --streaming --tokenizer "$W/build/tokenizer" --synthetic-input-tokens-mean 32 --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean 16 --concurrency 1 --request-count 20 --warmup-request-count 2 --random-seed 0 \
  --workers-max 1 --record-processors 1 --output-artifact-dir "$W/aiperf" > "$W/aiperf.log" 2>&1
.venv/bin/python - "$W" <<'PY'
import json, sys
w = sys.argv[1]
data = json.load(open(f"{w}/aiperf/inputs.json"))["data"]
with open(f"{w}/prompts.jsonl", "w") as f:
    for s in data:
        f.write(json.dumps({"text_input": s["payloads"][0]["text_input"]}) + "\n")
PY
$CLI .venv/bin/nvlm-bench run --url 127.0.0.1:$PORT --concurrency 1 --requests 20 --warmup 2 --max-tokens 16 --min-tokens 16 \
  --workload "jsonl:$W/prompts.jsonl" --out "$W/nvlm-bench" > /dev/null
.venv/bin/python - "$W" <<'PY'
import json, sys
w = sys.argv[1]
a = json.load(open(f"{w}/aiperf/profile_export_aiperf.json"))
n = json.load(open(f"{w}/nvlm-bench/bench.json"))["runs"][0]["summary"]
a_tokens = a["output_sequence_length"]["avg"]  # aiperf re-tokenizes the returned text
rows = [("TTFT p50 ms", a["time_to_first_token"]["p50"], n["ttft_ms"]["p50"]),
        ("ITL p50 ms", a["inter_token_latency"]["p50"], n["itl_ms"]["p50"]),
        # ITL depends on how tokens are counted; the decode time per request does not
        ("decode ms (ITL p50 x (tokens-1))", a["inter_token_latency"]["p50"] * (a_tokens - 1), n["itl_ms"]["p50"] * 15),
        ("request latency p50 ms", a["request_latency"]["p50"], n["e2e_ms"]["p50"]),
        ("request latency mean ms", a["request_latency"]["avg"], n["e2e_ms"]["mean"])]
print(f"{'metric':<34}{'aiperf (HTTP)':>14}{'nvlm-bench (gRPC)':>19}{'diff':>8}")
for name, x, y in rows:
    print(f"{name:<34}{x:>14.2f}{y:>19.2f}{(y - x) / x * 100:>7.1f}%")
print(f"aiperf output tokens per request (re-tokenized text): {a['output_sequence_length']['avg']:.0f}; "
      "nvlm-bench counts generated ids (16)")
PY
