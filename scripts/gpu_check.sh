#!/usr/bin/env bash
# The GPU check for a lent machine, in one call, and the bundle it needs (scripts/gpu_check.py says what it does):
#
#     bash scripts/gpu_check.sh --prepare .cache/gpu_bundle                  # any machine with the package index
#     bash scripts/gpu_check.sh --bundle .cache/gpu_bundle --out "$OUT"      # the GPU machine: no install, no network
#     GPU_CHECK_DRY=1 bash scripts/gpu_check.sh --bundle DIR --out DIR2      # every stage's plumbing on a CPU
#
# The python: $PYTHON if set, else the first of python3 (the lent machine's holds CUDA torch and Triton) and
# .venv/bin/python that imports torch and Triton. The repo is imported from this checkout: nothing is installed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 .venv/bin/python; do
        if "$candidate" -c "import torch, triton" >/dev/null 2>&1; then
            PY=$candidate
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check.sh: neither python3 nor .venv/bin/python imports torch and Triton: pass one as PYTHON=...," \
        "or create .venv with bash scripts/setup_env.sh where the package index is reachable" >&2
    exit 2
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" scripts/gpu_check.py "$@"
