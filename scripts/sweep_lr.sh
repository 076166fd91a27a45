#!/usr/bin/env bash
# LR-transfer sweep: widths x log2 LR multipliers x {sp, mup} x seeds, one scripts/mup_transfer.py run each.
# Resumable: a run whose row is already in the JSONL is skipped. Env overrides the lists:
#   WIDTHS="32 64 128 256" LRS="-3 -2 -1 0 1 2 3" MODES="sp mup" SEEDS="0 1" STEPS=60 SETUP=muon BASE=32
#   OUT=dev/transfer_lr_muon.jsonl
# Flags: --shard i/N runs every N-th job (j % N == i), e.g. two CPU processes, or one GPU per shard:
#   CUDA_VISIBLE_DEVICES=0 bash scripts/sweep_lr.sh --shard 0/2 & CUDA_VISIBLE_DEVICES=1 bash scripts/sweep_lr.sh --shard 1/2
#   --setup muon|adamw   --steps N   --out FILE
#   --hp output_mult     sweeps the muP output multiplier (log2 grid OMS, muP only: SP has no such knob) at the
#                        fixed LR multiplier 2^LR0 instead of the LR
set -euo pipefail
cd "$(dirname "$0")/.."
WIDTHS=${WIDTHS:-"32 64 128 256"}
LRS=${LRS:-"-3 -2 -1 0 1 2 3"}
OMS=${OMS:-"-4 -2 0 2 4"}
MODES=${MODES:-"sp mup"}
SEEDS=${SEEDS:-"0 1"}
STEPS=${STEPS:-60}
SETUP=${SETUP:-muon}
BASE=${BASE:-32}
LR0=${LR0:-0}
HP=lr
OUT=${OUT:-}
SHARD="0/1"
die() { echo "sweep_lr.sh: $1" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    [[ "$1" == --* && $# -ge 2 ]] || die "$1 needs a value (see the header of scripts/sweep_lr.sh)"
    case "$1" in
        --shard) SHARD="$2"; shift 2 ;;
        --setup) SETUP="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --hp) HP="${2//_/-}"; shift 2 ;;
        *) die "unknown argument $1 (see the header of scripts/sweep_lr.sh)" ;;
    esac
done
# every list and flag is checked before the first run, so a typo cannot fail a sweep halfway
[[ "$SHARD" =~ ^[0-9]+/[0-9]+$ ]] || die "--shard $SHARD: pass i/N, e.g. --shard 0/2"
SI=${SHARD%/*}; SN=${SHARD#*/}
(( SN >= 1 && SI < SN )) || die "--shard $SHARD: need N >= 1 and 0 <= i < N, e.g. --shard 0/2"
[[ "$SETUP" == muon || "$SETUP" == adamw ]] || die "--setup $SETUP: pass muon or adamw"
[[ "$HP" == lr || "$HP" == output-mult ]] || die "--hp $HP: pass lr or output_mult"
[[ -n "$OUT" && -d "$OUT" ]] && die "--out $OUT: is a directory: pass a .jsonl file path"
int_list() { for v in $2; do [[ "$v" =~ ^[0-9]+$ && "$v" -ge $3 ]] || die "$1=\"$2\": $v is not an integer >= $3"; done; }
num_list() { for v in $2; do [[ "$v" =~ ^-?[0-9]+(\.[0-9]+)?$ ]] || die "$1=\"$2\": $v is not a number like -1 or 0.5"; done; }
int_list WIDTHS "$WIDTHS" 1; int_list SEEDS "$SEEDS" 0; int_list STEPS "$STEPS" 1; int_list BASE "$BASE" 1
num_list LRS "$LRS"; num_list OMS "$OMS"; num_list LR0 "$LR0"
for m in $MODES; do [[ "$m" == sp || "$m" == mup ]] || die "MODES=\"$MODES\": $m is not sp or mup"; done
[[ -n "$WIDTHS" && -n "$SEEDS" && -n "$MODES" && -n "$LRS" && -n "$OMS" ]] || die "WIDTHS, SEEDS, MODES, LRS and OMS must not be empty"
if [[ "$HP" == "output-mult" ]]; then
    OUT=${OUT:-dev/transfer_om_${SETUP}.jsonl}; GRID=$OMS; MODES=mup
else
    OUT=${OUT:-dev/transfer_lr_${SETUP}.jsonl}; GRID=$LRS
fi
PY=${PY:-python}
# seeds outermost: an interrupted sweep still has complete curves for the first seeds
j=0
for seed in $SEEDS; do
for width in $WIDTHS; do
for mode in $MODES; do
for x in $GRID; do
    if (( j % SN == SI )); then
        if [[ "$HP" == "output-mult" ]]; then
            om=$($PY -c "print(2.0 ** ($x))")
            hpargs=(--lr-log2 "$LR0" --output-mult "$om")
        else
            hpargs=(--lr-log2 "$x")
        fi
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=. $PY scripts/mup_transfer.py --width "$width" --mode "$mode" \
            --seed "$seed" --steps "$STEPS" --setup "$SETUP" --base-width "$BASE" --out "$OUT" "${hpargs[@]}"
    fi
    j=$((j + 1))
done; done; done; done
