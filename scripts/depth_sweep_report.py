"""
Depth LR transfer report of scripts/sweep.sh directories with a depth-rule axis (--alphas): final val bits per byte
per (setup, depth rule, width, depth, log2 multiplier, seed), the fitted optimum per (width, depth) (parabola through
the best grid point and its neighbours, on the seed-mean; per seed for the error), the loss at the base value (the
value a transferred run uses when the sweep is centred on it), the optimum's spread over depths and its slope vs
log2 depth with a bootstrap interval, and a plot.

    bash scripts/sweep.sh --hp matrix_lr --out runs/depth_sweep_muon --modes mup --widths 128 --depths "2 4 8" \
        --alphas "0 1" --mults "-2 -1 0 1 2" --seeds 0 -- --matrix-optimizer muon --head-dim 32 ...
    python scripts/depth_sweep_report.py runs/depth_sweep_muon --out runs/depth_transfer
"""

import datetime
import json
import math
import os
import statistics

from nanochat.common import ArgParser

parser = ArgParser(description="depth LR transfer report")
parser.add("dirs", nargs="+", help="sweep directories written by scripts/sweep.sh with --alphas")
parser.add("--out", default="runs/depth_transfer", help="writes OUT.json, OUT.md and OUT.png")
args = parser.parse_args()
for d in args.dirs:
    if not os.path.isfile(os.path.join(d, "sweep.json")):
        parser.error(f"{d}: no sweep.json: pass a directory written by scripts/sweep.sh --alphas ...")

import numpy as np  # noqa: E402

from nanochat.transfer import ci95, fit_optimum, mean_curve, read_runs, slope  # noqa: E402


def rule_name(alpha):
    return "none" if alpha == 0 else "completep" if alpha == 1 else f"alpha={alpha:g}"


def load(dirs):
    """{(setup, rule, width, depth, x, seed): final val_bpb} over every finished point, and one settings line per
    setup. Every directory must sweep the same hyperparameter from the same base: x is a multiplier of that base."""
    res, settings, first = {}, set(), None
    for d in dirs:
        meta, rows = read_runs(d)
        if "alphas" not in meta:
            parser.error(f"{d}: a sweep without --alphas: report it with scripts/transfer_report.py")
        first = first or (d, meta["hp"], meta["base"])
        if (meta["hp"], meta["base"]) != first[1:]:
            parser.error(f"{d}: sweeps {meta['hp']} from base {meta['base']}, {first[0]} {first[1]} from {first[2]}: "
                         "report sweeps of one hyperparameter and one base value together")
        for r in rows:
            a = json.load(open(os.path.join(r["run"], "config.json")))["args"]
            res[a["matrix_optimizer"], rule_name(r["alpha"]), r["width"], r["depth"], r["x"], r["seed"]] = r["val_bpb"]
            settings.add(f"{a['matrix_optimizer']}: width {r['width']}, {a['num_iterations']} steps of "
                         f"{a['device_batch_size']} x {a['sequence_len']} tokens, base {meta['hp']} "
                         f"{', '.join(f'{v:g}' for v in meta['base'].values())}")
    return res, sorted(settings)


def depth_slope(per_depth, n_boot=1000, seed=0):
    """Slope of the fitted log2 optimum against log2 depth, and its 95% bootstrap interval (seeds resampled at each
    depth; nan with one seed). per_depth: {depth: (mults, Y[seed, mult])}."""
    rng = np.random.default_rng(seed)
    depths = sorted(per_depth)
    point = slope(depths, [fit_optimum(m, mean_curve(Y)) for m, Y in map(per_depth.get, depths)])
    if min(len(per_depth[d][1]) for d in depths) < 2:
        return point, math.nan, math.nan
    boot = np.array([slope(depths, [fit_optimum(m, mean_curve(Y[rng.integers(0, len(Y), len(Y))]))
                                    for m, Y in map(per_depth.get, depths)]) for _ in range(n_boot)])
    return (point, *ci95(boot))


res, settings = load(args.dirs)
if not res:
    parser.error(f"{args.dirs[0]}: no finished runs yet: run scripts/sweep.sh first")
rows, curves = [], {}  # curves: {(setup, rule, width, depth): (mults, Y[seed, mult])}
for key in sorted({k[:4] for k in res}):
    setup, rule, w, d = key
    mults = sorted({k[4] for k in res if k[:4] == key})
    seeds = sorted({k[5] for k in res if k[:4] == key})
    full = [s for s in seeds if all((*key, m, s) in res for m in mults)]
    Y = np.array([[res[(*key, m, s)] for m in mults] for s in full])
    mean = mean_curve(Y)
    opt = fit_optimum(mults, mean)
    per_seed = [fit_optimum(mults, y) for y in Y]
    rows.append(dict(setup=setup, rule=rule, width=w, depth=d, seeds=len(full), mults=mults, mean_bpb=mean, opt=opt,
                     opt_at_edge=opt in (mults[0], mults[-1]),
                     opt_seed_sd=statistics.stdev(per_seed) if len(per_seed) > 1 else None, best_bpb=min(mean),
                     base_bpb=mean[mults.index(0)] if 0 in mults else None))
    curves[key] = (mults, Y)
lines = [f"Depth LR transfer, {datetime.date.today()}: {len(res)} (setup, rule, width, depth, LR, seed) results from "
         f"`python scripts/depth_sweep_report.py {' '.join(args.dirs)} --out {args.out}`. " + "; ".join(settings) + ".",
         "", "| setup | depth rule | width | depth | seeds | fitted optimum (log2 x base) | seed sd | best val bpb | "
         "val bpb at the base |", "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    sd = "-" if r["opt_seed_sd"] is None else f"{r['opt_seed_sd']:.2f}"
    edge = " (grid edge)" if r["opt_at_edge"] else ""
    at_base = "-" if r["base_bpb"] is None else f"{r['base_bpb']:.4f}"
    lines.append(f"| {r['setup']} | {r['rule']} | {r['width']} | {r['depth']} | {r['seeds']} | {r['opt']:+.2f}{edge} "
                 f"| {sd} | {r['best_bpb']:.4f} | {at_base} |")
spread, slopes = {}, {}
for setup, rule, w in sorted({(r["setup"], r["rule"], r["width"]) for r in rows}):
    opts = [r["opt"] for r in rows if (r["setup"], r["rule"], r["width"]) == (setup, rule, w)]
    if len(opts) < 2:
        continue
    spread[f"{setup}/{rule}/w{w}"] = max(opts) - min(opts)
    slopes[f"{setup}/{rule}/w{w}"] = b, lo, hi = depth_slope({k[3]: c for k, c in curves.items()
                                                               if k[:3] == (setup, rule, w)})
    lines.append(f"\n{setup}, {rule}, width {w}: optimum spread over depths {max(opts) - min(opts):.2f} (log2); slope "
                 f"of the optimum vs log2 depth {b:+.2f} [{lo:+.2f}, {hi:+.2f}] (95% bootstrap over seeds)")
text = "\n".join(lines)
print(text)
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out + ".md", "w") as f:
    f.write(text + "\n")
with open(args.out + ".json", "w") as f:
    runs = [[*k, v] for k, v in sorted(res.items())]
    json.dump(dict(rows=rows, spread=spread, slopes=slopes, runs=runs), f, indent=0)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

panels = sorted({k[:2] for k in curves})
fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
for ax, (setup, rule) in zip(axes[0], panels):
    for key in sorted(k for k in curves if k[:2] == (setup, rule)):
        xs, Y = curves[key]
        line, = ax.plot(xs, mean_curve(Y), marker="o", lw=1, label=f"width {key[2]}, depth {key[3]}")
        opt = next(r["opt"] for r in rows if (r["setup"], r["rule"], r["width"], r["depth"]) == key)
        ax.axvline(opt, color=line.get_color(), ls=":", lw=0.8)
    title = {"none": "no depth rule", "completep": "CompleteP alpha=1", "alpha=0.5": "Depth-muP alpha=0.5"}
    ax.set_title(f"{setup}, {title.get(rule, rule)}", fontsize=9)
    ax.set_xlabel("log2 LR multiplier", fontsize=8)
    ax.legend(fontsize=7)
axes[0][0].set_ylabel("final val bits per byte", fontsize=8)
fig.suptitle("depth LR transfer (dotted: fitted optimum)", fontsize=9)
fig.tight_layout()
fig.savefig(args.out + ".png", dpi=90)
