#!/usr/bin/env bash
# README command 2: set up the environment if needed, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
