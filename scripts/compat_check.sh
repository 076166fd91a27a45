#!/usr/bin/env bash
# The lent GPU machine's stack on a CPU machine: torch 2.11.0 and its Triton 3.6.0 (the oldest pair pyproject.toml
# admits) in a second virtual environment, running what can run without a GPU:
#   - the interpreter tier of the kernel tests (tests/test_attention.py, tests/test_head.py),
#   - the CUDA-path emulation (tests/test_cuda_path.py, and base_train's CUDA recipe in tests/test_train.py),
#   - the sm_90 compile check of every launch config with Triton 3.6's compiler (tests/test_kernel_configs.py),
#   - the sharded optimizer under torchrun (tests/test_dist.py, its first test: reduce-scatter and all-gather),
#   - the CPU path without Triton (tests/test_no_triton.py), base_train's kernel choice (tests/test_kernel_choice.py),
#     and what the lent stack lacks or names differently (tests/test_lent_stack.py).
#
#     bash scripts/compat_check.sh [pytest args]
#
# Not part of CI: torch 2.11.0 from the package index is the CUDA build, several GB, downloaded once into
# $COMPAT_VENV (default ~/.cache/nanochat-mup/compat-torch2.11) and reused. The environment has what the lent
# machine has (numpy, pyarrow, tiktoken, tqdm, matplotlib, filelock, pytest; no wandb) plus rustbpe, which the
# tests' corpus fixture needs to train its tokenizer. Prints a summary (versions, each file's result, time).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${COMPAT_VENV:-$HOME/.cache/nanochat-mup/compat-torch2.11}
# numpy<2.4: Triton 3.6's interpreter converts 1-element arrays with int(), an error since NumPy 2.4 (Triton 3.7 fixed
# it). Only the interpreter (CPU tests) is affected; the compiled kernels on a GPU never run that code.
PINS=(torch==2.11.0 triton==3.6.0 "numpy<2.4" pyarrow tiktoken tqdm matplotlib filelock pytest rustbpe)
if [ ! -x "$VENV/bin/python" ]; then
    echo "compat_check: creating $VENV (torch's CUDA build: a large download, once)"
    python3 -m venv "$VENV"
fi
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "${PINS[*]}" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
    echo "${PINS[*]}" >"$VENV/.pins"
fi

TESTS=(tests/test_attention.py tests/test_head.py tests/test_cuda_path.py
       "tests/test_train.py::test_cuda_recipe_bf16_triton_kernels" tests/test_kernel_configs.py
       "tests/test_dist.py::test_sharded_ranks_match_one_process_accumulating" tests/test_no_triton.py
       tests/test_kernel_choice.py tests/test_lent_stack.py)
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
t0=$SECONDS
set +e
env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -rfEs -p no:cacheprovider "${TESTS[@]}" "$@" \
    2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
echo
echo "## compat_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - t0)) s)"
"$VENV/bin/python" - <<'EOF'
import platform, torch, triton
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA build {torch.version.cuda}) | "
      f"triton {triton.__version__} | CUDA available: {torch.cuda.is_available()}")
EOF
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (uncommitted changes)')"
echo "pytest (exit $rc): $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$LOG" | tail -n 1 | tr -d '=')"
grep -E '^(FAILED|ERROR) ' "$LOG" | cut -c1-200 || true
exit "$rc"
