"""
Does muP pay off? At a target width, train (>= 3 fresh seeds, the same tokens) three arms built from finished
per-hyperparameter sweeps (scripts/sweep.sh directories with sp and mup runs):
- mup:       muP with every swept hyperparameter at the optimum fitted at the BASE width (tuned on the proxy,
             transferred as is): what a muP user gets without tuning the big model;
- sp:        SP with every swept hyperparameter at SP's own optimum fitted AT the target width (tuned there);
- mup_tuned: muP at its own optimum fitted at the target width: the gap mup - mup_tuned is what transfer cost.
Several sweeps of one hyperparameter may be given in order (a second tuning pass with the other groups at their
tuned values): for each arm the last sweep with runs of its mode at its width wins.
Each arm is one scripts/sweep.sh call (so it is resumable, shardable and launched like any sweep) into OUT/<arm>;
then the report: mean val bpb per arm, and mup - sp and mup - mup_tuned with 95% bootstrap intervals (seeds of
each arm resampled independently). Fresh seeds, not the sweeps' own, keep the tuned arms from being favoured by
the noise they were selected on. Swept groups are tuned one at a time and then combined (TP5 tunes per group too).

    python scripts/payoff.py runs/sweep_matrix_lr runs/sweep_unembedding_lr --width 256 --seeds "3 4 5" \
        --out runs/payoff

Along batch and horizon (--target-batch, --target-tokens): two muP arms at --width (default: the base width), both
with the hyperparameters fitted at the base width on the sweeps' batch and tokens, trained at the target's:
- rules: with the batch and horizon rules (nanochat/scaling.py) from the sweeps' shape to the target's;
- plain: the same values unscaled. The report gives rules - plain.
"""

import json
import math
import os
import shlex
import subprocess
import sys

from nanochat.common import ArgParser, atomic_write_text

parser = ArgParser(description="muP with proxy-tuned hyperparameters vs SP tuned at the target width")
parser.add("dirs", nargs="+", help="sweep directories (one hyperparameter each) with sp and mup runs")
parser.add("--width", type=int, default=0, min=0, help="target width: swept by both modes (0 = the widest swept)")
parser.add("--seeds", default="100 101 102", help="seeds of the payoff runs (fresh ones: not the sweeps')")
parser.add("--out", default="", path="out", fix="pass a writable directory, e.g. --out runs/payoff",
           help="payoff directory (the arms' run directories, payoff.md, payoff.json)")
parser.add("--shard", default="0/1", help="passed to sweep.sh: run every N-th point (i/N), for parallel processes")
parser.add("--n-boot", type=int, default=10000, min=1, help="bootstrap resamples")
parser.add("--report-only", action="store_true", help="report the finished runs, start none")
parser.add("--target-batch", default="0",
           help="tokens per step of the rules payoff (auto: Power Lines from the sweeps' batch and tokens)")
parser.add("--target-tokens", type=int, default=0, min=0, help="training tokens of the rules payoff (0 = the sweeps')")
parser.add("--batch-lr-scaling", type=float, default=0.5, min=0, help="LR batch rule exponent of the rules arm")
args = parser.parse_args()
if args.target_batch != "auto" and not args.target_batch.isdigit():
    parser.error(f"--target-batch={args.target_batch}: pass a number of tokens, 0 (the sweeps') or auto")
rules = args.target_batch != "0" or args.target_tokens > 0
if not args.out:
    parser.error("--out is required: the payoff directory, e.g. --out runs/payoff")
seeds = args.seeds.split()
if len(seeds) < 2 or not all(s.isdigit() for s in seeds):
    parser.error(f"--seeds {args.seeds!r}: pass at least 2 non-negative integers, e.g. --seeds \"100 101 102\"")
seeds = [str(int(v)) for v in seeds]  # "007" is seed 7, as base_train reads it
for d in args.dirs:
    if not os.path.isfile(os.path.join(d, "sweep.json")):
        parser.error(f"{d}: no sweep.json: pass a directory written by scripts/sweep.sh")

import numpy as np  # noqa: E402

from nanochat.scaling import auto_batch  # noqa: E402
from nanochat.transfer import HORIZON_OPTS, drop_options, read_runs, summarize, swept_options  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------------------------------
# tuned values from the sweeps


swept = swept_options(args.dirs)


def unfinished(d, rows):
    """Why a sweep is not complete yet ("" if it is): fitting a half-finished sweep (a shard still running) would
    launch the arms with a different value than the finished sweep gives."""
    running = sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n, "point.json"))
                     and not os.path.exists(os.path.join(d, n, "DONE")))
    if running:
        return f"{len(running)} run(s) not finished (e.g. {running[0]})"
    for key in {(r["mode"], r["width"], r["depth"]) for r in rows}:
        cell = {(r["x"], r["seed"]) for r in rows if (r["mode"], r["width"], r["depth"]) == key}
        full = {(x, s) for x, _ in cell for _, s in cell}
        if cell != full:
            x, s = min(full - cell)
            return f"{key[0]} width {key[1]} has no run at log2 multiplier {x}, seed {s}"
    return ""


sweeps, common, ctx, shape = [], None, None, None
for d in args.dirs:
    meta, rows = read_runs(d)
    if not rows:
        parser.error(f"{d}: no finished runs yet: run scripts/sweep.sh first")
    why = unfinished(d, rows)
    if why:
        parser.error(f"{d}: the sweep is not complete ({why}): let every shard finish, or re-run sweep.sh")
    depths = {r["depth"] for r in rows}
    base_width = next((r["base_width"] for r in rows if r["mode"] == "mup"), 0)
    if len(depths) != 1 or not base_width:
        parser.error(f"{d}: need muP runs at exactly one depth (found depths {sorted(depths)}, base width "
                     f"{base_width}): sweep one depth with --modes \"sp mup\"")
    rest = drop_options(meta["extra"], swept)
    if common is None:
        common, ctx = rest, (depths.pop(), base_width)
    elif (rest, (depths.pop(), base_width)) != (common, ctx):
        parser.error(f"{d}: its base_train options, depth or base width differ from {args.dirs[0]}'s: "
                     "compare sweeps of one setup")
    shapes = {(r["batch"], r["tokens"]) for r in rows}
    if len(shapes) > 1 or shape not in (None, *shapes):
        parser.error(f"{d}: runs of several batches or horizons ({sorted(shapes)}): pass width sweeps of one shape")
    shape = shapes.pop()
    sweeps.append((d, meta, summarize(rows, "val_bpb", 200)))
depth, base_width = ctx
width = args.width or (base_width if rules else max(w for _, _, s in sweeps for k in s for w in s[k]["values"]))


def optimum(d, s, mode, w):
    """The fitted optimum (log2 multiplier) of `mode` at width `w` in one sweep's summary, None if not swept there."""
    if (mode, depth) not in s or w not in s[mode, depth]["values"]:
        return None
    x = s[mode, depth]["optima"][s[mode, depth]["values"].index(w)]
    if not math.isfinite(x):
        parser.error(f"{d}: every {mode} run at width {w} diverged: widen the sweep's --mults")
    return x


# a later sweep of the same hyperparameter (a second tuning pass, the other groups at their tuned values) overrides
# an earlier one wherever it has runs of that mode and width
arms = {"mup": ("mup", base_width), "sp": ("sp", width), "mup_tuned": ("mup", width)}
if rules:
    arms = {"rules": ("mup", base_width), "plain": ("mup", base_width)}
tuned = {arm: {} for arm in arms}  # arm -> {option: (value, log2 multiplier on its sweep's base)}
for arm, (mode, w) in arms.items():
    for d, meta, s in sweeps:
        x = optimum(d, s, mode, w)
        if x is not None:
            tuned[arm].update({o: (v * 2.0 ** x, x) for o, v in meta["base"].items()})
    for d, meta, _ in sweeps:
        if any(o not in tuned[arm] for o in meta["base"]):
            parser.error(f"{d}: no {mode} runs of {meta['hp']} at width {w} in any sweep: sweep it there "
                         "(sweep.sh --widths) or pass another --width")

# -----------------------------------------------------------------------------------------------------
# runs: one sweep.sh call per arm, a single multiplier (0) on the tuned values

first = sweeps[0][1]["hp"]
target = []  # the rules payoff: every arm at the target's batch and horizon
if rules:
    tokens = args.target_tokens or shape[1]
    batch = auto_batch(tokens, *shape) if args.target_batch == "auto" else int(args.target_batch) or shape[0]
    target = ["--batches", str(batch), "--horizons", str(tokens)]
    common = drop_options(common, set(HORIZON_OPTS) | {"--total-batch-size"})
arm_opts = dict(rules=["--ref-batch-size", str(shape[0]), "--ref-tokens", str(shape[1]), "--batch-lr-scaling",
                       f"{args.batch_lr_scaling:g}", "--wd-scaling", "1"],
                plain=["--batch-lr-scaling", "0", "--wd-scaling", "0"])
for arm, (mode, _) in arms.items():
    opts = [a for o, (v, _) in tuned[arm].items() for a in (o, f"{v:.6g}")] + arm_opts.get(arm, [])
    cmd = ["bash", os.path.join(ROOT, "scripts", "sweep.sh"), "--hp", first, "--out", os.path.join(args.out, arm),
           "--widths", str(width), "--base-width", str(base_width), "--mults", "0", "--seeds", " ".join(seeds),
           "--modes", mode, "--depths", str(depth), "--shard", args.shard, *target, "--", *common, *opts]
    print(f"{arm}: {shlex.join(cmd)}", flush=True)
    if not args.report_only:
        rc = subprocess.call(cmd)
        if rc:
            sys.exit(rc)

# -----------------------------------------------------------------------------------------------------
# report

vals = {}
for arm in arms:
    d = os.path.join(args.out, arm)
    rows = read_runs(d)[1] if os.path.isdir(d) else []  # only this call's seeds: the directory may hold more
    vals[arm] = np.array([r["val_bpb"] for r in sorted(rows, key=lambda r: r["seed"]) if str(r["seed"]) in seeds])
missing = [a for a in arms if len(vals[a]) < len(seeds)]
if missing:
    print(f"not all runs finished yet ({', '.join(f'{a}: {len(vals[a])}/{len(seeds)}' for a in missing)}): "
          "run again (finished runs are kept) to complete the report")
    sys.exit(0)
rng = np.random.default_rng(0)


def diff(a, b):
    """mean(a) - mean(b) with a 95% bootstrap interval (each arm's seeds resampled on their own)."""
    A, B = vals[a], vals[b]
    pick = [X[rng.integers(0, len(X), (args.n_boot, len(X)))].mean(1) for X in (A, B)]
    boot = pick[0] - pick[1]
    return dict(mean=float(A.mean() - B.mean()), ci=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))])


compare = ([("rules", "plain", "with the batch and horizon rules - without")] if rules else
           [("mup", "sp", "muP transferred - SP tuned at the target"),
            ("mup", "mup_tuned", "muP transferred - muP tuned at the target (cost of transfer)")])
res = dict(width=width, base_width=base_width, depth=depth, seeds=seeds, common_options=common,
           tuned={a: {o: dict(value=v, log2_mult=x) for o, (v, x) in t.items()} for a, t in tuned.items()},
           val_bpb={a: vals[a].tolist() for a in arms}, **{f"{a}_minus_{b}": diff(a, b) for a, b, _ in compare})
if rules:
    res.update(proxy=dict(batch=shape[0], tokens=shape[1]), target=dict(batch=batch, tokens=tokens))
where = f" at {batch:,} tokens per step, {tokens:,} tokens (proxy: {shape[0]:,} x {shape[1]:,})" if rules else ""
lines = [f"# muP payoff at width {width}{where} (base width {base_width}, depth {depth})", "",
         f"Sweeps: {', '.join(args.dirs)}. Common base_train options: `{shlex.join(common)}`. "
         f"Seeds {' '.join(seeds)}.", "",
         "| arm | tuned where | " + " | ".join(f"{o} (log2 mult)" for o in tuned[compare[0][0]])
         + " | val bpb per seed | mean |",
         "|---|---|" + "---|" * len(tuned[compare[0][0]]) + "---|---|"]
for arm, (mode, w) in arms.items():
    cells = " | ".join(f"{v:.4g} ({x:+.2f})" for v, x in tuned[arm].values())
    lines.append(f"| {arm} | {mode} at width {w} | {cells} | {' '.join(f'{v:.4f}' for v in vals[arm])} "
                 f"| {vals[arm].mean():.4f} |")
for a, b, what in compare:
    r = res[f"{a}_minus_{b}"]
    lines.append(f"\n- {what}: {r['mean']:+.4f} bpb [95% CI {r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]")
atomic_write_text(os.path.join(args.out, "payoff.md"), "\n".join(lines) + "\n")
atomic_write_text(os.path.join(args.out, "payoff.json"), json.dumps(res, indent=1))
print("\n".join(lines))
print(f"wrote {args.out}/payoff.md and payoff.json")
