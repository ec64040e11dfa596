#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) from the pinned CI set.
# Idempotent: a stamp records the hash of the requirements and pyproject; a second run with
# nothing changed installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${NVLM_VENV:-.venv}
stamp="$VENV/.nvlm-stamp"
want=$(cat requirements/ci.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import builder" 2>/dev/null; then
  exit 0
fi
echo "[bootstrap] setting up $VENV (pinned set: requirements/ci.txt) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" >&2
# torch==2.13.0 resolves to the CPU wheel these machines keep on local disk.
"$VENV/bin/python" -m pip install -q -r requirements/ci.txt >&2
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >&2
echo "$want" > "$stamp"
echo "[bootstrap] done" >&2
