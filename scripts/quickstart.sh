#!/usr/bin/env bash
# The main job from a fresh clone: .venv + dependencies, the Shakespeare demo corpus, a BPE tokenizer,
# a muP training run on the CPU (or GPU if present), then a sample. Rerunning it resumes/reuses everything.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python -m nanochat.dataset shakespeare
python scripts/tok_train.py --vocab-size 4096
OUT=runs/quickstart
RESUME=()
if [ -f "$OUT/config.json" ] && ls "$OUT"/checkpoints/step_*/meta.json >/dev/null 2>&1; then
    RESUME=(--resume)  # an earlier quickstart: continue it (or just report it, if it finished)
fi
# every LR x3 (2^1.58) above the defaults: the optimum a muP proxy sweep at widths 64 and 128 found at this shape
# (T 256, 4096 tokens per step, 200 steps; dev/ab_nanochat.md). The defaults are nanochat's, for far bigger runs.
LRS=(--matrix-lr 0.06 --embedding-lr 0.9 --unembedding-lr 0.024 --scalar-lr 1.5)
python scripts/base_train.py --depth 4 --aspect-ratio 64 --head-dim 64 --mup-base-width 64 "${LRS[@]}" \
    --sequence-len 256 --device-batch-size 16 --num-iterations "${QUICKSTART_STEPS:-250}" \
    --eval-every 100 --eval-tokens 32768 --save-every 100 --out-dir "$OUT" "${RESUME[@]}"
python scripts/sample.py --run "$OUT" --prompt "ROMEO:" --max-tokens 80
