#!/usr/bin/env bash
# Hyperparameter-transfer sweep on the real training path: widths x depths x one hyperparameter's log2
# multipliers x seeds x modes (sp, mup), one scripts/base_train.py run per point, each in its own run directory
# OUT/<mode>_d<depth>_w<width>_x<log2 mult>_s<seed>/ (base_train's config.json, metrics.jsonl, train.log, plus
# point.json and, once finished, DONE). Then: python scripts/transfer_report.py OUT
#
#   bash scripts/sweep.sh --hp matrix_lr --out runs/sweep_mlr --widths "64 128 256" --mults "-2 -1 0 1 2" \
#       --seeds "0 1 2" -- --head-dim 32 --num-iterations 200 --data-dir DATA
#
# --hp         matrix_lr embedding_lr unembedding_lr scalar_lr lr (all four LRs) output_mult attn_mult
#              weight_decay init_scale: scaled by 2^x from its base value (the one given after --, else
#              base_train's default), every other hyperparameter at its base
# --widths     n_embd per point (multiples of the head dim)       --mults   log2 multipliers
# --seeds      --seed per point                                   --modes   "sp mup" (output/attn_mult: mup)
# --base-width muP base width (default: the first width)           --depths  --depth per point (default "4")
# --base-depth passed as --mup-base-depth under muP (default: none, i.e. each point's own depth)
# --batches    total batch in tokens per point (--total-batch-size; run directories get _b<B>, point.json "batch")
# --horizons   training tokens per point (--target-tokens; run directories get _t<D>, point.json "tokens")
# --alphas     depth-rule axis (muP only): per alpha, 0 = no depth rule (each point is its own base depth), > 0 =
#              --mup-base-depth (--base-depth, default the first depth) and --depth-alpha ALPHA (1 CompleteP, 0.5
#              Depth-muP). Run directories get a suffix _a<alpha>, point.json an "alpha"; report with
#              python scripts/depth_sweep_report.py OUT
# --shard i/N  this process runs jobs j with j % N == i (or SHARD=i/N): N processes, or one GPU each
# --keep-checkpoints   keep each run's final checkpoint (default: deleted once the run is DONE)
# after --     base_train options for every point (data, tokenizer, steps, batch, optimizer, ...)
# LAUNCH       the launcher (default: python), e.g. LAUNCH="torchrun --standalone --nproc_per_node=8"
#
# Resumable: a point with DONE is skipped; any other run directory is a killed run and restarts from scratch.
# A run that stops on a non-finite value (base_train exit 3) is a finished point that diverged. Any other
# failure stops the sweep, naming its log. Every argument is checked before the first run (one line, exit 2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PY}
HP="" OUT="" WIDTHS="64 128 256" MULTS="-2 -1 0 1 2" SEEDS="0 1 2" MODES="sp mup" DEPTHS="4" BASE="" BDEPTH="" ALPHAS=""
BATCHES="" HORIZONS=""
SHARD=${SHARD:-0/1} KEEP=0
die() { echo "sweep.sh: $1" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --) shift; break ;;
        --keep-checkpoints) KEEP=1; shift; continue ;;
    esac
    [[ $# -ge 2 ]] || die "$1 needs a value (see the header of scripts/sweep.sh)"
    case "$1" in
        --hp) HP="$2" ;; --out) OUT="$2" ;; --widths) WIDTHS="$2" ;; --mults) MULTS="$2" ;; --seeds) SEEDS="$2" ;;
        --modes) MODES="$2" ;; --depths) DEPTHS="$2" ;; --base-width) BASE="$2" ;; --base-depth) BDEPTH="$2" ;;
        --shard) SHARD="$2" ;; --alphas) ALPHAS="$2" ;; --batches) BATCHES="$2" ;; --horizons) HORIZONS="$2" ;;
        *) die "unknown argument $1: pass sweep options, then -- and base_train options" ;;
    esac
    shift 2
done
[[ -n "$HP" ]] || die "--hp is required, e.g. --hp matrix_lr"
[[ -n "$OUT" ]] || die "--out is required: the sweep directory, e.g. --out runs/sweep_matrix_lr"
[[ -e "$OUT" && ! -d "$OUT" ]] && die "--out $OUT is a file: pass a directory"
[[ "$SHARD" =~ ^[0-9]+/[0-9]+$ ]] || die "--shard $SHARD: pass i/N, e.g. --shard 0/2"
SI=${SHARD%/*} SN=${SHARD#*/}
(( SN >= 1 && SI < SN )) || die "--shard $SHARD: need N >= 1 and 0 <= i < N, e.g. --shard 1/2"
ints() { [[ -n "$2" ]] || die "$1 is empty"; for v in $2; do [[ "$v" =~ ^[0-9]+$ && "$v" -ge $3 ]] ||
    die "$1 \"$2\": $v is not an integer >= $3"; done; }
ints --widths "$WIDTHS" 2; ints --seeds "$SEEDS" 0; ints --depths "$DEPTHS" 1
[[ -z "$BATCHES" ]] || ints --batches "$BATCHES" 1; [[ -z "$HORIZONS" ]] || ints --horizons "$HORIZONS" 1
BASE=${BASE:-${WIDTHS%% *}}
[[ -z "$ALPHAS" ]] || BDEPTH=${BDEPTH:-${DEPTHS%% *}}
ints --base-width "$BASE" 2; [[ -z "$BDEPTH" ]] || ints --base-depth "$BDEPTH" 1
[[ -n "$MULTS" ]] || die "--mults is empty"
for v in $MULTS; do [[ "$v" =~ ^-?[0-9]+(\.[0-9]+)?$ ]] || die "--mults \"$MULTS\": $v is not a number like -1 or 0.5"; done
for v in $ALPHAS; do [[ "$v" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--alphas \"$ALPHAS\": $v is not a number like 0 or 0.5"; done
[[ -n "$MODES" ]] || die "--modes is empty"
for m in $MODES; do [[ "$m" == sp || "$m" == mup ]] || die "--modes \"$MODES\": $m is not sp or mup"; done
cd "$ROOT"
# the swept options per multiplier (checks the hyperparameter, the base options and an existing OUT/sweep.json)
PLAN=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" $PY -m nanochat.transfer plan "$OUT" "$HP" "$MULTS" "$MODES" \
    "$WIDTHS $BASE" "$ALPHAS" "$BATCHES" "$HORIZONS" -- "$@") || exit 2
declare -A SWEPT
while IFS=$'\t' read -r x args; do SWEPT[$x]=$args; done <<< "$PLAN"
XS=$(cut -f1 <<< "$PLAN")

# seeds outermost: an interrupted sweep still has complete curves for the first seeds
JOBS=()
j=0
for seed in $SEEDS; do for depth in $DEPTHS; do for width in $WIDTHS; do for mode in $MODES; do
for alpha in ${ALPHAS:--}; do for batch in ${BATCHES:--}; do for tokens in ${HORIZONS:--}; do
for x in $XS; do  # "-": no such axis
    (( j % SN == SI )) && JOBS+=("$seed $depth $width $mode $x $alpha $batch $tokens")
    j=$((j + 1))
done; done; done; done; done; done; done; done
n=${#JOBS[@]} k=0 ran=0 spent=0
echo "sweep $HP: $j points, $n in shard $SHARD -> $OUT"
for job in "${JOBS[@]}"; do
    read -r seed depth width mode x alpha batch tokens <<< "$job"
    k=$((k + 1))
    run="$OUT/${mode}_d${depth}_w${width}_x${x}_s${seed}"
    depth_rule=(${BDEPTH:+--mup-base-depth "$BDEPTH"}) point_more=""
    if [[ "$alpha" != - ]]; then
        run+="_a$alpha" point_more=", \"alpha\": $alpha" depth_rule=()
        [[ "$alpha" == 0 ]] || depth_rule=(--mup-base-depth "$BDEPTH" --depth-alpha "$alpha")
    fi
    shape=()  # the batch and horizon axes
    [[ "$batch" == - ]] || { run+="_b$batch" point_more+=", \"batch\": $batch" shape+=(--total-batch-size "$batch"); }
    [[ "$tokens" == - ]] || { run+="_t$tokens" point_more+=", \"tokens\": $tokens" shape+=(--target-tokens "$tokens"); }
    if [[ -f "$run/DONE" ]]; then
        echo "[$k/$n] $run: done ($(cat "$run/DONE")), skipped"; continue
    fi
    rm -rf "$run"  # a killed run: its partial files would mislead the reader and base_train's --out-dir check
    mkdir -p "$run"
    printf '{"mode": "%s", "depth": %d, "width": %d, "x": %s, "seed": %d%s}\n' "$mode" "$depth" "$width" "$x" "$seed" \
        "$point_more" > "$run/point.json"
    mup=()
    [[ "$mode" == mup ]] && mup=(--mup-base-width "$BASE" "${depth_rule[@]}")
    t0=$(date +%s)
    rc=0
    # shellcheck disable=SC2086  # LAUNCH and the planned options are word lists; the swept value goes last, after
    # the base value given after -- (argparse keeps the last)
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" $LAUNCH scripts/base_train.py --n-embd "$width" --depth "$depth" \
        --seed "$seed" --out-dir "$run" "${mup[@]}" "${shape[@]}" "$@" ${SWEPT[$x]} > "$run/train.log" 2>&1 || rc=$?
    case $rc in
        0) status=ok ;;
        3) status=diverged ;;
        *) echo "sweep.sh: $run failed (exit $rc): see $run/train.log" >&2; tail -n 3 "$run/train.log" >&2; exit 1 ;;
    esac
    (( KEEP )) || rm -rf "$run/checkpoints"
    echo "$status" > "$run/DONE"
    dt=$(( $(date +%s) - t0 )) ran=$((ran + 1)) spent=$((spent + $(date +%s) - t0))
    eta=$(( spent * (n - k) / ran ))
    printf '[%d/%d] %s: %s in %ds | ETA %dh%02dm%02ds\n' "$k" "$n" "$run" "$status" "$dt" \
        $((eta / 3600)) $((eta % 3600 / 60)) $((eta % 60))
done
echo "sweep $HP shard $SHARD: all $n points done in $OUT"
