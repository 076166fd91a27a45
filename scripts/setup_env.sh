#!/usr/bin/env bash
# Creates .venv and installs the repo (editable, with the dev extra) on first use, at the exact versions of
# constraints.txt (pyproject.toml only states the supported ranges); later calls only reinstall when either file
# changed. Sourced by quickstart.sh and test.sh; needs only python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.nanochat-mup-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing dependencies into .venv (first run: about a minute)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" -c constraints.txt
    echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
