"""
Depth LR transfer report of scripts/sweep.sh directories with a depth-rule axis (--alphas): final val bits per byte
per (setup, depth rule, depth, log2 multiplier, seed), the fitted optimum per depth (parabola through the best grid
point and its neighbours, on the seed-mean; per seed for the error), its spread over depths, and a plot.

    bash scripts/sweep.sh --hp matrix_lr --out runs/depth_sweep_muon --modes mup --widths 128 --depths "2 4 8" \
        --alphas "0 1" --mults "-2 -1 0 1 2" --seeds 0 -- --matrix-optimizer muon --head-dim 32 ...
    python scripts/depth_sweep_report.py runs/depth_sweep_muon runs/depth_sweep_adamw --out dev/depth_transfer
"""

import datetime
import json
import os
import statistics

from nanochat.common import ArgParser

parser = ArgParser(description="depth LR transfer report")
parser.add("dirs", nargs="+", help="sweep directories written by scripts/sweep.sh with --alphas")
parser.add("--out", default="dev/depth_transfer", help="writes OUT.json, OUT.md and OUT.png")
args = parser.parse_args()
for d in args.dirs:
    if not os.path.isfile(os.path.join(d, "sweep.json")):
        parser.error(f"{d}: no sweep.json: pass a directory written by scripts/sweep.sh --alphas ...")

from nanochat.transfer import fit_optimum, read_runs  # noqa: E402


def rule_name(alpha):
    return "none" if alpha == 0 else "completep" if alpha == 1 else f"alpha={alpha:g}"


def load(dirs):
    """{(setup, rule, depth, x, seed): final val_bpb} over every finished point, and one settings line per setup."""
    res, settings = {}, set()
    for d in dirs:
        meta, rows = read_runs(d)
        if "alphas" not in meta:
            parser.error(f"{d}: a sweep without --alphas: report it with scripts/transfer_report.py")
        for r in rows:
            a = json.load(open(os.path.join(r["run"], "config.json")))["args"]
            res[a["matrix_optimizer"], rule_name(r["alpha"]), r["depth"], r["x"], r["seed"]] = r["val_bpb"]
            settings.add(f"{a['matrix_optimizer']}: width {r['width']}, {a['num_iterations']} steps of "
                         f"{a['device_batch_size']} x {a['sequence_len']} tokens, base {meta['hp']} "
                         f"{', '.join(f'{v:g}' for v in meta['base'].values())}")
    return res, sorted(settings)


res, settings = load(args.dirs)
if not res:
    parser.error(f"{args.dirs[0]}: no finished runs yet: run scripts/sweep.sh first")
rows, curves = [], {}
for setup, rule, d in sorted({k[:3] for k in res}):
    mults = sorted({k[3] for k in res if k[:3] == (setup, rule, d)})
    seeds = sorted({k[4] for k in res if k[:3] == (setup, rule, d)})
    full = [s for s in seeds if all((setup, rule, d, m, s) in res for m in mults)]
    mean = [statistics.mean(res[setup, rule, d, m, s] for s in full) for m in mults]
    opt = fit_optimum(mults, mean)
    per_seed = [fit_optimum(mults, [res[setup, rule, d, m, s] for m in mults]) for s in full]
    rows.append(dict(setup=setup, rule=rule, depth=d, seeds=len(full), mults=mults, mean_bpb=mean, opt=opt,
                     opt_at_edge=opt in (mults[0], mults[-1]),
                     opt_seed_sd=statistics.stdev(per_seed) if len(per_seed) > 1 else None, best_bpb=min(mean)))
    curves[setup, rule, d] = (mults, mean)
lines = [f"Depth LR transfer, {datetime.date.today()}: {len(res)} (setup, rule, depth, LR, seed) results from "
         f"`python scripts/depth_sweep_report.py {' '.join(args.dirs)} --out {args.out}`. " + "; ".join(settings) + ".",
         "", "| setup | depth rule | depth | seeds | fitted optimum (log2 x base LR) | seed sd | best val bpb |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    sd = "-" if r["opt_seed_sd"] is None else f"{r['opt_seed_sd']:.2f}"
    edge = " (grid edge)" if r["opt_at_edge"] else ""
    lines.append(f"| {r['setup']} | {r['rule']} | {r['depth']} | {r['seeds']} | {r['opt']:+.2f}{edge} | {sd} | "
                 f"{r['best_bpb']:.4f} |")
spread = {}
for setup, rule in sorted({(r["setup"], r["rule"]) for r in rows}):
    opts = [r["opt"] for r in rows if (r["setup"], r["rule"]) == (setup, rule)]
    spread[f"{setup}/{rule}"] = max(opts) - min(opts)
    lines.append(f"\n{setup}, {rule}: optimum spread over depths {max(opts) - min(opts):.2f} (log2)")
text = "\n".join(lines)
print(text)
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out + ".md", "w") as f:
    f.write(text + "\n")
with open(args.out + ".json", "w") as f:
    json.dump(dict(rows=rows, spread=spread, runs=[[*k, v] for k, v in sorted(res.items())]), f, indent=0)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

panels = sorted({(s, r) for s, r, _ in curves})
fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
for ax, (setup, rule) in zip(axes[0], panels):
    for d in sorted(d for s, r, d in curves if (s, r) == (setup, rule)):
        xs, ys = curves[setup, rule, d]
        line, = ax.plot(xs, ys, marker="o", lw=1, label=f"depth {d}")
        opt = next(r["opt"] for r in rows if (r["setup"], r["rule"], r["depth"]) == (setup, rule, d))
        ax.axvline(opt, color=line.get_color(), ls=":", lw=0.8)
    ax.set_title(f"{setup}, {'no depth rule' if rule == 'none' else rule.replace('completep', 'CompleteP alpha=1')}",
                 fontsize=9)
    ax.set_xlabel("log2 LR multiplier", fontsize=8)
    ax.legend(fontsize=7)
axes[0][0].set_ylabel("final val bits per byte", fontsize=8)
fig.suptitle("depth LR transfer (dotted: fitted optimum)", fontsize=9)
fig.tight_layout()
fig.savefig(args.out + ".png", dpi=90)
