"""
Plot an LR (or output_mult) transfer sweep: loss vs log2(multiplier), one curve per width, SP and muP panels,
seed error bars (std), fitted optimum marked. Prints the fitted optimum per width, the spread per mode
(max - min of the fitted log2 optima) and the muP "wider is better" check.

    python scripts/plot_transfer.py --results dev/transfer_lr_muon.jsonl --out dev/transfer_lr_muon.png
"""

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanochat.transfer import read_rows, row_key, transfer_summary  # noqa: E402

parser = argparse.ArgumentParser(description="plot a muP transfer sweep")


def arg(name, **kw):
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*names, **kw)


arg("results", default="dev/transfer_lr_muon.jsonl")
arg("out", default="", help="PNG path; default: results with .png")
arg("metric", choices=["train_loss", "val_loss"], default="train_loss")
arg("hp", choices=["lr_log2", "output_mult"], default="lr_log2")
arg("steps", type=int, default=0, help="keep only rows with this many steps (0 = all)")
arg("widths", default="", help="comma list of widths to keep (default all)")
arg("range", default="", help="LO,HI: keep only x in [LO, HI] (the common grid)")
arg("setup", default="", help="keep only rows of this setup (muon/adamw)")
args = parser.parse_args()

# -----------------------------------------------------------------------------------------------------
# load, summarise

rows = list({row_key(r): r for r in reversed(read_rows(args.results))}.values())  # a key twice: keep the first
if args.setup:
    rows = [r for r in rows if r["setup"] == args.setup]
if args.steps:
    rows = [r for r in rows if r["steps"] == args.steps]
if args.widths:
    keep = {int(w) for w in args.widths.split(",")}
    rows = [r for r in rows if r["width"] in keep]
if args.hp == "output_mult":
    for r in rows:
        r["om_log2"] = math.log2(r["output_mult"])
hp = "om_log2" if args.hp == "output_mult" else "lr_log2"
if args.range:
    lo, hi = (float(v) for v in args.range.split(","))
    rows = [r for r in rows if lo <= r[hp] <= hi]
s = transfer_summary(rows, args.metric, hp)
label = "log2 output_mult" if args.hp == "output_mult" else "log2 LR multiplier"
summary = dict(results=args.results, metric=args.metric, hp=hp, n_rows=len(rows),
               optima={f"{m} {w}": round(v, 3) for (m, w), v in sorted(s["optima"].items())},
               spread={m: round(v, 3) for m, v in s["spread"].items()}, wider_is_better=s["wider_is_better"],
               seeds=sorted({r["seed"] for r in rows}))
for (mode, width), v in sorted(s["optima"].items()):
    n = min(s["curves"][(mode, width)][3])
    print(f"{mode:<4} width {width:>5}: fitted optimum {label} = {v:+.3f} (min seeds per point {n})")
for mode, v in s["spread"].items():
    print(f"{mode:<4} spread of fitted optima (max - min): {v:.3f} log2")
print(f"muP wider is better (within 2 log2 of the optimum): {s['wider_is_better']}")
print(json.dumps(summary))

# -----------------------------------------------------------------------------------------------------
# figure

modes = [m for m in ("sp", "mup") if any(k[0] == m for k in s["curves"])]
fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.4), squeeze=False, sharey=True)
finite = [y for c in s["curves"].values() for y in c[1] if math.isfinite(y)]
lo, hi = min(finite), min(max(finite), min(finite) + 1.5)
for ax, mode in zip(axes[0], modes):
    widths = sorted(w for m, w in s["curves"] if m == mode)
    cmap = plt.get_cmap("viridis")
    for i, w in enumerate(widths):
        xs, ys, sd, _ = s["curves"][(mode, w)]
        color = cmap(i / max(1, len(widths) - 1))
        ys_plot = [y if math.isfinite(y) else float("nan") for y in ys]
        ax.errorbar(xs, ys_plot, yerr=sd, color=color, marker=".", ms=4, lw=1, capsize=2, label=f"width {w}")
        opt = s["optima"][(mode, w)]
        if math.isfinite(opt):
            ax.axvline(opt, color=color, ls=":", lw=0.8)
    ax.set_title(f"{mode.upper()}: optimum spread {s['spread'][mode]:.2f} log2", fontsize=9)
    ax.set_xlabel(label, fontsize=8)
    ax.set_ylim(lo - 0.02, hi)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
axes[0][0].set_ylabel(args.metric, fontsize=8)
fig.suptitle(f"{args.results} ({len(summary['seeds'])} seeds)", fontsize=8)
fig.tight_layout()
out = args.out or args.results.rsplit(".", 1)[0] + ".png"
fig.savefig(out, dpi=80)
print(f"saved {out}")
