#!/usr/bin/env bash
# Depth LR transfer sweep through base_train (issue 15): fixed width, several depths, matrix-LR multipliers on a
# log2 grid, with the CompleteP depth rule (alpha 1, base depth = the first depth) and without any depth rule.
# One training process at a time, one --out-dir per point; finished points (final val_bpb logged) are skipped,
# so re-running the same command resumes the sweep. Checkpoints are deleted after each run (only config.json and
# metrics.jsonl are read). Analyse with: python scripts/depth_sweep_report.py OUT_ROOT
#   bash scripts/depth_sweep.sh OUT_ROOT SETUP "SEEDS" "DEPTHS" "LOG2_MULTS" STEPS
#   e.g. bash scripts/depth_sweep.sh runs/depth_sweep muon "0" "2 4 8" "-2 -1 0 1 2" 150
set -euo pipefail
if [ $# -ne 6 ]; then
    echo "usage: $0 OUT_ROOT SETUP(muon|adamw) \"SEEDS\" \"DEPTHS\" \"LOG2_MULTS\" STEPS" >&2
    exit 2
fi
root=$1 setup=$2 seeds=$3 depths=$4 mults=$5 steps=$6
case $setup in muon) base_lr=0.02 ;; adamw) base_lr=0.003 ;; *) echo "$0: SETUP=$setup: use muon or adamw" >&2; exit 2 ;; esac
width=${WIDTH:-128}
base_depth=${depths%% *}
py=${PYTHON:-python}
for seed in $seeds; do
    for depth in $depths; do
        for rule in none completep; do
            # at the base depth every depth factor is exactly 1: the two rules are the same run
            if [ "$depth" = "$base_depth" ] && [ $rule = completep ]; then continue; fi
            depth_args=()
            if [ $rule = completep ]; then depth_args=(--mup-base-depth "$base_depth" --depth-alpha 1); fi
            for m in $mults; do
                lr=$($py -c "print($base_lr * 2 ** $m)")
                out="$root/$setup/$rule/d$depth/m$m/s$seed"
                if [ -f "$out/metrics.jsonl" ] && tail -1 "$out/metrics.jsonl" | grep -q "\"step\": $steps,.*val_bpb"; then
                    continue
                fi
                rm -rf "$out"; mkdir -p "$(dirname "$out")"
                echo "$(date -u +%H:%M:%S) $setup $rule depth $depth log2 mult $m seed $seed"
                OMP_NUM_THREADS=1 WANDB_MODE=disabled $py scripts/base_train.py --depth "$depth" --n-embd "$width" \
                    --head-dim 32 --mup-base-width "$width" "${depth_args[@]}" --matrix-optimizer "$setup" \
                    --matrix-lr "$lr" --sequence-len 64 --device-batch-size 8 --num-iterations "$steps" \
                    --eval-every 0 --eval-tokens 8192 --seed "$seed" --device cpu --out-dir "$out" > "$out.log" 2>&1 \
                    || { echo "failed: see $out.log" >&2; exit 1; }
                rm -rf "$out/checkpoints"
            done
        done
    done
done
