#!/usr/bin/env bash
# GPU check for a lent H100 (see docs/PERFORMANCE.md). Installs nothing: the device image has
# torch, triton and numpy; Pillow and the project's pure-Python code travel with the tree.
# Usage on the device: scripts/gpu_check.sh   → results in $OUT (or docs/gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# NVLM's reference tiling needs Pillow < 12.2 (runtime/preprocess.py: check_pillow). If the device
# image has a newer one, use a carried wheel (docs/PERFORMANCE.md says how to fetch it into .whl/).
if ! python3 -c 'import PIL, sys; sys.exit(tuple(map(int, PIL.__version__.split(".")[:2])) >= (12, 2))'; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pillow-12.1*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton, PIL; print('torch', torch.__version__, 'triton', triton.__version__, 'pillow', PIL.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python3 scripts/gpu_check.py "$@"
