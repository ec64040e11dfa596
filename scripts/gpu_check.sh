#!/usr/bin/env bash
# GPU check for a lent H100 (see docs/PERFORMANCE.md). Installs nothing: the device image has
# torch, triton and numpy; Pillow and the project's pure-Python code travel with the tree.
# Usage on the device: scripts/gpu_check.sh   → results in $OUT (or docs/gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# Wheels carried in .whl/ (scripts/gpu_wheels.sh fetches them; pass carry: [".whl"]) fill what the
# device image lacks: NVLM's reference tiling needs Pillow < 12.2 (runtime/preprocess.py:check_pillow);
# the reference-runtime part needs transformers, tokenizers and safetensors.
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
carried() { python3 -m pip install -q --no-index --no-deps --find-links .whl --target /tmp/site "$@"; }
if ! python3 -c 'import PIL, sys; sys.exit(tuple(map(int, PIL.__version__.split(".")[:2])) >= (12, 2))'; then
  carried pillow==12.1.1
fi
RUNTIME=()
if ! python3 -c 'import transformers, tokenizers, safetensors' 2>/dev/null; then
  carried transformers==4.57.6 tokenizers safetensors huggingface-hub hf-xet regex pyyaml requests urllib3 idna \
    certifi charset-normalizer tqdm filelock fsspec packaging typing-extensions \
    || { echo "reference runtime skipped: transformers is not on this image and .whl/ does not hold it" >&2
         RUNTIME=(--no-runtime); }
fi
python3 -c "import torch, triton, PIL; print('torch', torch.__version__, 'triton', triton.__version__, 'pillow', PIL.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python3 scripts/gpu_check.py ${RUNTIME[@]+"${RUNTIME[@]}"} "$@"
# Issue 30: the layer-at-a-time fp8 + FP8-KV build of a 72B-shaped slice (1 decoder : 2 vision layers, 8.9 GB
# written first) with its layers on the GPU: wall time and peak RSS. Needs nvidia-modelopt (carried in .whl/ or
# on the image); kept within 7 minutes so that the whole check stays within its budget.
if python3 -c 'import modelopt.torch.quantization' 2>/dev/null; then
  timeout 420 python3 benchmarks/real_scale.py --work /tmp/real_scale --depths 1:2 --stages llm-fp8 --device cuda \
    --rss-limit-gb 100 --json "${OUT:-docs/gpu}/real_scale_cuda.json" || echo "layer-at-a-time slice build: failed or over 7 min" >&2
else
  echo "layer-at-a-time slice build skipped: nvidia-modelopt is not on this image (carry it in .whl/)" >&2
fi
