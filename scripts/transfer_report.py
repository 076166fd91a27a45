"""
Report of one or more hyperparameter-transfer sweeps (scripts/sweep.sh directories, one hyperparameter each):
loss vs log2 multiplier per width as PNG, the fitted optimum per width with a 95% bootstrap interval over seeds,
the slope of the log2 optimum against log2 width with its interval, the wider-is-better check, and the
recommended hyperparameters for a target width as a ready base_train command line (from the muP runs).

    python scripts/transfer_report.py runs/sweep_matrix_lr runs/sweep_unembedding_lr --target-width 1024

Writes to --out (default: the first DIR): transfer_<hp>.png per sweep, report.md, report.json.
"""

import json
import math
import os
import shlex

from nanochat.common import ArgParser

parser = ArgParser(description="report of hyperparameter-transfer sweeps")
parser.add("dirs", nargs="+", help="sweep directories written by scripts/sweep.sh")
parser.add("--metric", default="val_bpb", choices=["val_bpb", "train_loss"],
           help="final val bits per byte, or the train loss averaged over the last 10%% of steps")
parser.add("--target-width", type=int, default=0, min=0, help="width to recommend for (0 = 4x the widest swept)")
parser.add("--n-boot", type=int, default=1000, min=1, help="bootstrap resamples of the seeds")
parser.add("--out", default="", path="out", help="report directory (default: the first DIR)")
args = parser.parse_args()
for d in args.dirs:
    if not os.path.isfile(os.path.join(d, "sweep.json")):
        parser.error(f"{d}: no sweep.json: pass a directory written by scripts/sweep.sh")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanochat.transfer import drop_options, read_runs, recommend, summarize, swept_options  # noqa: E402

out_dir = args.out or args.dirs[0]
os.makedirs(out_dir, exist_ok=True)


def fmt(v, ci=None):
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci and all(map(math.isfinite, ci)) else "")


def plot(meta, summary, path):
    keys = sorted(summary)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False, sharey=True)
    finite = [y for s in summary.values() for ys in s["means"] for y in ys if math.isfinite(y)]
    lo, hi = min(finite), min(max(finite), min(finite) + 1.0)
    cmap = plt.get_cmap("viridis")
    for ax, key in zip(axes[0], keys):
        s = summary[key]
        for i, w in enumerate(s["widths"]):
            color = cmap(i / max(1, len(s["widths"]) - 1))
            ys = [y if math.isfinite(y) else float("nan") for y in s["means"][i]]
            ax.plot(s["xs"][i], ys, color=color, marker="o", ms=3, lw=1,
                    label=f"width {w} (opt {fmt(s['optima'][i])})")
            if math.isfinite(s["optima"][i]):
                ax.axvline(s["optima"][i], color=color, ls=":", lw=0.8)
        ax.set_title(f"{key[0].upper()} depth {key[1]}: slope {fmt(s['slope'], s['slope_ci'])}", fontsize=8)
        ax.set_xlabel(f"log2 multiplier on {meta['hp']} (base {', '.join(f'{v:g}' for v in meta['base'].values())})",
                      fontsize=8)
        ax.set_ylim(lo - 0.01, hi)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(f"{args.metric} (mean over seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


lines, report, recs, widest = [], {}, {}, 0
swept = swept_options(args.dirs)
for d in args.dirs:
    meta, rows = read_runs(d)
    if "alphas" in meta:  # optima over depth, not width
        parser.error(f"{d}: a sweep with a depth-rule axis (--alphas): report it with scripts/depth_sweep_report.py")
    if not rows:
        parser.error(f"{d}: no finished runs yet: run scripts/sweep.sh first")
    summary = summarize(rows, args.metric, args.n_boot)
    # a second sweep of one hyperparameter (a tuning pass with the other groups at their tuned values) gets its own
    # key and plot, and overrides the first in the recommendation, as in payoff.py
    n = sum(k == meta["hp"] or k.startswith(meta["hp"] + "_pass") for k in report)
    key = f"{meta['hp']}_pass{n + 1}" if n else meta["hp"]
    png = os.path.join(out_dir, f"transfer_{key}.png")
    plot(meta, summary, png)
    widest = max(widest, max(r["width"] for r in rows))
    lines += [f"## {key} ({d})", "", f"Base {meta['base']}; base_train options: `{shlex.join(meta['extra'])}`; "
              f"{len(rows)} runs ({sum(r['diverged'] for r in rows)} diverged); metric {args.metric}; plot "
              f"`{os.path.basename(png)}`.", "",
              "| mode | depth | width | seeds | fitted optimum (log2) [95% CI] | best loss |",
              "|---|---|---|---|---|---|"]
    for (mode, dep), s in sorted(summary.items()):
        for i, w in enumerate(s["widths"]):
            lines.append(f"| {mode} | {dep} | {w} | {s['n_seeds'][i]} | {fmt(s['optima'][i], s['optima_ci'][i])} "
                         f"| {s['best'][i]:.4f} |")
    lines.append("")
    for (mode, dep), s in sorted(summary.items()):
        lines.append(f"- {mode} depth {dep}: slope of log2 optimum vs log2 width {fmt(s['slope'], s['slope_ci'])}; "
                     f"wider is better (best loss falls with width): {s['wider_is_better']}")
    lines.append("")
    report[key] = dict(dir=d, meta=meta, summary={f"{m} {dep}": s for (m, dep), s in summary.items()})
    mup = sorted(k for k in summary if k[0] == "mup")  # the muP runs, at the first depth (no depth rule yet)
    if mup:
        base_width = next(r["base_width"] for r in rows if r["mode"] == "mup")
        recs.pop(meta["hp"], None)  # re-inserted last: the command lists the groups in the order of their last pass
        recs[meta["hp"]] = (key, meta, summary[mup[0]], mup[0][1], base_width)
    else:
        lines += [f"No muP runs in {d}: nothing to recommend for {meta['hp']}.", ""]

# -----------------------------------------------------------------------------------------------------
# recommendation: every swept hyperparameter at its transferred value, the others as in the (first) sweep

target = args.target_width or 4 * widest
cmd = None
if recs:
    rec_args = []
    first = next(iter(recs.values()))
    for key, meta, s, _, _ in recs.values():
        x, how = recommend(s, first[4], target)
        report[key].update(recommended_log2=x, recommended_how=how)
        if math.isfinite(x):
            rec_args += [a for o, v in meta["base"].items() for a in (o, f"{v * 2.0 ** x:.4g}")]
        lines.append(f"- {key}: recommended log2 multiplier at width {target}: {fmt(x)} ({how})")
    _, meta, _, depth, base_width = first
    if any((drop_options(m["extra"], swept), bw) != (drop_options(meta["extra"], swept), base_width)
           for _, m, _, _, bw in recs.values()):
        lines.append("- WARNING: the sweeps differ in base_train options or base width: the command uses the first's")
    cmd = shlex.join(["python", "scripts/base_train.py", "--n-embd", str(target), "--depth", str(depth),
                      "--mup-base-width", str(base_width), *drop_options(meta["extra"], set(rec_args[::2])), *rec_args])
    lines += ["", f"Recommended base_train command for width {target} (muP, base width {base_width}):", "",
              f"    {cmd}", ""]
open(os.path.join(out_dir, "report.md"), "w").write("# Transfer report\n\n" + "\n".join(lines))
json.dump(dict(metric=args.metric, target_width=target, command=cmd, sweeps=report),
          open(os.path.join(out_dir, "report.json"), "w"), indent=1)
print("\n".join(lines))
print(f"wrote {out_dir}/report.md, report.json and the plots")
