#!/usr/bin/env bash
# Fetch the wheels scripts/gpu_check.sh installs on a lent GPU machine, which reaches no network:
# Pillow 12.1 (NVLM's resize order, see runtime/preprocess.py:check_pillow) and the transformers stack
# for the reference-runtime part. Into .whl/ (git-ignored via .git/info/exclude); pass carry: [".whl"].
#   scripts/gpu_wheels.sh [PYTHON_VERSIONS...]     default: 3.10 3.11 3.12 (the device image's is not known ahead)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# the device image has torch and numpy; everything else transformers imports is listed (installed --no-deps)
PKGS=(pillow==12.1.1 transformers==4.57.6 tokenizers==0.22.2 safetensors==0.8.0 huggingface-hub==0.36.2
      hf-xet==1.8.0 regex pyyaml==6.0.4 requests urllib3 idna certifi charset-normalizer tqdm filelock fsspec packaging
      typing-extensions)
for v in "${@:-3.10 3.11 3.12}"; do
  for ver in $v; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$ver" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${PKGS[@]}"
  done
done
du -sh .whl
