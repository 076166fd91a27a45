#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the fast (CPU) test tier.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the GPU tier.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python -m pytest -q "$@"
