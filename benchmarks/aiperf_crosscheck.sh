#!/usr/bin/env bash
# Opt-in cross-check of nvlm-bench against NVIDIA's aiperf on the same server, prompts and minute.
#   benchmarks/aiperf_crosscheck.sh      (creates .aiperf-venv with `pip install aiperf`, ~1.1 GB, once)
# Knobs (environment): RATE requests/s per tool (2), N requests per tool (200), OSL output tokens (16),
# ISL approximate prompt words (32), KEEP_DIR keep the work directory there, MODE triton (default) or chat,
# CONCURRENCY: a closed loop at this concurrency instead of the Poisson rate (the tools then take turns).
# MODE=chat: both tools drive the OpenAI endpoint (`nvlm-serve --openai-port`, /v1/chat/completions,
# streamed as server-sent events): aiperf with its native `chat` endpoint type, nvlm-bench with its OpenAI
# client; OSL forced with vLLM's `min_tokens` extension, which the endpoint takes.
#
# Method. On a shared 2-vCPU VM the server's own speed drifts by tens of percent within seconds,
# so two tools run one after the other measure two different servers. Here both run AT THE SAME
# TIME as open-loop Poisson clients at a low rate against one server: they sample the same seconds
# of server behaviour, and at ~15% utilization their requests rarely meet. aiperf drives Triton's
# HTTP generate_stream (template endpoint, response_field text_output); nvlm-bench drives gRPC
# streaming; both send the same prompts with OSL tokens forced by min_tokens. The server is
# pinned to CPU 0 and both clients to CPU 1 (aiperf's several processes would otherwise take CPU
# time from the server while it is measured).
#
# Inter-token latency. aiperf's own ITL divides (latency − TTFT) by the output length it counts by
# re-tokenizing the returned text; the demo model emits random byte-level ids whose text does not
# re-tokenize to the same count (e.g. 21 for 16), so that figure uses a different token count, not
# different timing. Compared like for like: aiperf's per-request latency and TTFT (its own
# timestamps, profile_export.jsonl) over the server's OSL − 1 gaps, against nvlm-bench's TPOT and
# mean inter-token gap for the same OSL.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
AIPERF_VENV=${AIPERF_VENV:-.aiperf-venv}
[ -x "$AIPERF_VENV/bin/aiperf" ] || { python3 -m venv "$AIPERF_VENV"; "$AIPERF_VENV/bin/pip" install -q 'aiperf==0.13.*'; }
RATE=${RATE:-2}; N=${N:-200}; OSL=${OSL:-16}; ISL=${ISL:-32}; MODE=${MODE:-triton}
case "$MODE" in triton|chat) ;; *) echo "MODE must be triton or chat, got $MODE" >&2; exit 2;; esac
W=${KEEP_DIR:-$(mktemp -d)}; mkdir -p "$W"
NB=.venv/bin/nvlm-build
$NB demo-checkpoint "$W/ckpt" --force >/dev/null
rm -rf "$W/build"
$NB engine "$W/ckpt" -o "$W/build" --quant bf16 --target reference --vision-dtype fp32 --json >/dev/null
PORT=$(( 26000 + RANDOM % 2000 ))
SRV=""; CLI=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then SRV="taskset -c 0"; CLI="taskset -c 1"; fi
$SRV .venv/bin/nvlm-serve "$W/build" --grpc-port $PORT --http-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
  --openai-port $((PORT + 3)) > "$W/serve.out" 2>&1 &
PID=$!; APID=""
trap 'kill $PID $APID 2>/dev/null; wait $PID 2>/dev/null' EXIT
for _ in $(seq 1 120); do grep -q "^serving" "$W/serve.out" && break; sleep 0.5; done

# the same prompts for both tools: nvlm-bench's JSONL (text_input) and aiperf's single_turn JSONL (text)
.venv/bin/python - "$W" "$N" "$ISL" <<'PY'
import json, random, sys
w, n, words = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
vocab = "the a image tile model token latency server request stream vision encoder layer text answer".split()
with open(f"{w}/prompts.jsonl", "w") as a, open(f"{w}/aiperf_prompts.jsonl", "w") as b:
    for k in range(n):
        text = f"Question {k}: " + " ".join(rng.choice(vocab) for _ in range(words))
        a.write(json.dumps({"text_input": text}) + "\n")
        b.write(json.dumps({"text": text}) + "\n")
PY
printf '%s\n' "{\"text_input\": {{ text|tojson }}, \"max_tokens\": $OSL, \"stream\": true, \"min_tokens\": $OSL}" > "$W/template.jinja"

served() {  # requests the entry model has completed so far
  .venv/bin/python -c "import tritonclient.grpc as g, sys; s=g.InferenceServerClient(sys.argv[1]).get_inference_statistics('nvlm', as_json=True)
print(s['model_stats'][0]['inference_stats'].get('success', {}).get('count', 0))" "127.0.0.1:$PORT"
}
# warm the server up before either tool measures
.venv/bin/nvlm-client --url 127.0.0.1:$PORT --prompt "warm up" --max-tokens 4 >/dev/null
START=$(served)
if [ "$MODE" = chat ]; then
  ENDPOINT=(--url "http://127.0.0.1:$((PORT + 3))" --endpoint-type chat --extra-inputs "max_tokens:$OSL"
            --extra-inputs "min_tokens:$OSL")
  BENCH_URL="http://127.0.0.1:$((PORT + 3))/v1"
else
  ENDPOINT=(--url "http://127.0.0.1:$((PORT + 1))/v2/models/nvlm/generate_stream" --endpoint-type template
            --extra-inputs "payload_template:$W/template.jinja" --extra-inputs response_field:text_output)
  BENCH_URL="127.0.0.1:$PORT"
fi
AIPERF=("$AIPERF_VENV/bin/aiperf" profile --model nvlm "${ENDPOINT[@]}" --streaming --tokenizer "$W/build/tokenizer"
        --input-file "$W/aiperf_prompts.jsonl" --custom-dataset-type single_turn --request-count "$N"
        --warmup-request-count 2 --random-seed 0 --workers-max 1 --record-processors 1 --ui-type none
        --output-artifact-dir "$W/aiperf")
BENCH=(.venv/bin/nvlm-bench run --url "$BENCH_URL" --requests "$N" --warmup 0 --seed 1 --max-tokens "$OSL"
       --min-tokens "$OSL" --workload "jsonl:$W/prompts.jsonl")
if [ -n "${CONCURRENCY:-}" ]; then
  # closed loop at a fixed concurrency (genai-perf's and perf_analyzer's mode): two closed loops at once
  # would double the load, so the tools take turns — nvlm-bench, aiperf, nvlm-bench — and aiperf is
  # compared with the mean of the two nvlm-bench runs around it (the drift between turns shows as their
  # difference)
  KEEP=(); [ "$MODE" = triton ] && KEEP=(--keep-streams)
  $CLI "${BENCH[@]}" --concurrency "$CONCURRENCY" "${KEEP[@]}" --out "$W/nvlm-bench" > /dev/null
  $CLI "${AIPERF[@]}" --concurrency "$CONCURRENCY" > "$W/aiperf.log" 2>&1 || { echo "aiperf failed; see $W/aiperf.log" >&2; exit 1; }
  $CLI "${BENCH[@]}" --concurrency "$CONCURRENCY" "${KEEP[@]}" --out "$W/nvlm-bench-after" > /dev/null
else
  $CLI "${AIPERF[@]}" --request-rate "$RATE" --request-rate-mode poisson > "$W/aiperf.log" 2>&1 &
  APID=$!
  # aiperf spends ~20 s starting its services: start nvlm-bench when aiperf's first request is served
  for _ in $(seq 1 600); do [ "$(served)" -gt "$START" ] && break; kill -0 $APID 2>/dev/null || break; sleep 0.2; done
  $CLI "${BENCH[@]}" --request-rate "$RATE" --out "$W/nvlm-bench" > /dev/null
  wait $APID || { echo "aiperf failed; see $W/aiperf.log" >&2; exit 1; }
  APID=""
fi
.venv/bin/python - "$W" "$OSL" <<'PY'
import json, sys
import numpy as np
w, osl = sys.argv[1], int(sys.argv[2])
recs = [json.loads(l) for l in open(f"{w}/aiperf/profile_export.jsonl")]
recs = [r["metrics"] for r in recs if r["metadata"].get("benchmark_phase") != "warmup" and "request_latency" in r["metrics"]]
lat = np.array([r["request_latency"]["value"] for r in recs])
ttft = np.array([r["time_to_first_token"]["value"] for r in recs])
a_itl_server = (lat - ttft) / (osl - 1)  # aiperf's timestamps, the server's token count
a_osl = np.mean([r["output_sequence_length"]["value"] for r in recs])
a_itl_own = np.array([r["inter_token_latency"]["value"] for r in recs])
from pathlib import Path
runs = [json.load(open(f"{w}/{d}/bench.json"))["runs"][0] for d in ("nvlm-bench", "nvlm-bench-after")
        if Path(f"{w}/{d}/bench.json").exists()]
run = runs[0]
if len(runs) == 2:  # closed loop: the mean of the runs before and after aiperf's
    print("nvlm-bench before / after aiperf: TTFT p50 %.2f / %.2f ms, request latency p50 %.2f / %.2f ms" % tuple(
        r["summary"][k]["p50"] for k in ("ttft_ms", "e2e_ms") for r in runs))
n = {key: ({s: float(np.mean([r["summary"][key][s] for r in runs])) for s in runs[0]["summary"][key]}
           if isinstance(runs[0]["summary"][key], dict) else runs[0]["summary"][key]) for key in runs[0]["summary"]}
rows = [("TTFT p50", np.percentile(ttft, 50), n["ttft_ms"]["p50"]),
        ("TTFT mean", ttft.mean(), n["ttft_ms"]["mean"]),
        ("ITL p50 (per request, OSL-1 gaps)", np.percentile(a_itl_server, 50), n["tpot_ms"]["p50"]),
        ("ITL mean (per request, OSL-1 gaps)", a_itl_server.mean(), n["tpot_ms"]["mean"]),
        ("request latency p50", np.percentile(lat, 50), n["e2e_ms"]["p50"]),
        ("request latency mean", lat.mean(), n["e2e_ms"]["mean"])]
print(f"aiperf: {len(recs)} requests; nvlm-bench: {n['succeeded']}/{n['requests']}; "
      f"{'concurrency ' + str(run['level']) + ', in turn' if len(runs) == 2 else str(run['level']) + ' req/s Poisson, simultaneously'}, "
      f"{osl} output tokens")
print(f"{'metric (ms)':<38}{'aiperf':>10}{'nvlm-bench':>12}{'diff':>8}")
out = []
for name, x, y in rows:
    print(f"{name:<38}{x:>10.2f}{y:>12.2f}{(y - x) / x * 100:>7.1f}%")
    out.append({"metric": name, "aiperf_ms": float(x), "nvlm_bench_ms": float(y), "diff_pct": float((y - x) / x * 100)})
print(f"{'(nvlm-bench mean inter-token gap)':<38}{'':>10}{n['itl_ms']['mean']:>12.2f}")
print(f"(aiperf's own ITL p50 {np.percentile(a_itl_own, 50):.2f} ms divides by {a_osl:.0f} re-tokenized tokens "
      f"instead of the {osl} generated)")
json.dump({"rows": out, "aiperf_requests": len(recs), "aiperf_retokenized_osl": float(a_osl),
           "aiperf_own_itl_p50_ms": float(np.percentile(a_itl_own, 50))}, open(f"{w}/crosscheck.json", "w"), indent=2)
PY
