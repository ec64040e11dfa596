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
