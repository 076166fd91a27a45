#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: environment report, the whole test suite (fast and slow tiers),
# the attention and head benchmarks, a short compiled bf16 training run on the Triton kernels (tokens/s, MFU)
# and, with 2+ GPUs, a torchrun run with the sharded optimizer.
#
#     bash scripts/gpu_check.sh
#
# Writes dev/gpu/<date>-<gpu>.md (each step's pass/fail, time and output tail) and, next to it, a folder with
# the full logs and the benchmark tables. Exits 1 if any step failed. Without CUDA: one line, exit 2.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! bash scripts/setup_env.sh >"$TMP/setup.log" 2>&1; then
    echo "gpu_check.sh: setting up .venv failed (bash scripts/setup_env.sh):"
    tail -n 20 "$TMP/setup.log"
    exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to check"
    exit 2
fi

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
SLUG=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
STEM="dev/gpu/$(date -u +%Y-%m-%d)-$SLUG"
OUT="$ROOT/$STEM"
mkdir -p "$OUT"
REPORT="$OUT.md"
SECTIONS="$TMP/sections.md"
SUMMARY="$TMP/summary.md"
: >"$SECTIONS"
: >"$SUMMARY"
FAILED=0

# step NAME COMMAND...: runs the command (output shown and saved to $OUT/NAME.log), records pass/fail + tail
step() {
    local name=$1
    shift
    local log="$OUT/$name.log" t0=$SECONDS rc
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local result="pass"
    if [ "$rc" -ne 0 ]; then
        result="FAIL (exit $rc)"
        FAILED=1
    fi
    echo "| $name | $result | $((SECONDS - t0)) s |" >>"$SUMMARY"
    {
        echo "## $name: $result"
        echo
        echo "\`$*\` (full log: [$name.log]($(basename "$OUT")/$name.log))"
        echo
        echo '```'
        tail -n 40 "$log"
        echo '```'
        echo
    } >>"$SECTIONS"
}

environment() {
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv ||
        echo "(nvidia-smi not available: no driver version)"
    python - <<'EOF'
import platform, torch, triton
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}) | triton {triton.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB {p.multi_processor_count} SMs")
EOF
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"
}

prepare_data() {
    python -m nanochat.dataset shakespeare && python scripts/tok_train.py --vocab-size 4096
}

# train RUN_DIR LAUNCHER...: a short compiled bf16 run on the Triton kernels (GQA, sliding-window layers),
# then the median tokens/s and MFU of the steps after compilation. Under torchrun: the sharded optimizer.
train() {
    local dir=$1
    shift
    local extra=()
    if [ "$1" = torchrun ]; then extra=(--optimizer-sharding on); fi
    "$@" scripts/base_train.py --depth 8 --aspect-ratio 64 --head-dim 128 --n-kv-head 2 --window-pattern SSSL \
        --sequence-len 1024 --device-batch-size 16 --num-iterations 40 --eval-every 0 --eval-tokens 65536 \
        --dtype bfloat16 --compile 1 --attn-impl triton --head-impl triton --out-dir "$dir" "${extra[@]}" || return
    python - "$dir/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])][10:]  # skip compilation and warm-up
tok = statistics.median(r["tok_per_s"] for r in rows)
mfu = statistics.median(r["mfu"] for r in rows)
print(f"steady state (steps 11-{10 + len(rows)}, median): {tok:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
      "(of the H100's 989 TFLOP/s bf16 dense, as base_train counts it)")
EOF
}

step environment environment
step tests python -m pytest -q
step tests-slow python -m pytest -q -m slow
step bench-attention python scripts/bench_attention.py --out-dir "$OUT"
step bench-head python scripts/bench_head.py --device cuda --out "$OUT/bench_head_cuda.md"
step data prepare_data
step train train "$TMP/train" python
if [ "$NGPU" -ge 2 ]; then
    step train-torchrun train "$TMP/train_dist" torchrun --standalone --nproc_per_node="$NGPU"
fi

{
    echo "# GPU check: $NGPU x $GPU, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Written by \`bash scripts/gpu_check.sh\`. Result: $([ $FAILED = 0 ] && echo 'all steps passed' || echo 'FAILED')."
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    cat "$SUMMARY"
    echo
    cat "$SECTIONS"
} >"$REPORT"
echo "gpu_check.sh: report written to $STEM.md ($([ $FAILED = 0 ] && echo 'all steps passed' || echo 'some steps FAILED'))"
exit $FAILED
