"""
Depth LR transfer report over the run directories of scripts/depth_sweep.sh: final val bits-per-byte per
(setup, depth rule, depth, log2 LR multiplier, seed), the fitted optimum per depth (parabola through the best
grid point and its neighbours, on the seed-mean; per seed for the error), its spread over depths, and a plot.

    python scripts/depth_sweep_report.py runs/depth_sweep --out dev/depth_transfer
"""

import datetime
import glob
import json
import os
import statistics

from nanochat.common import ArgParser
from nanochat.transfer import fit_optimum

parser = ArgParser(description="depth LR transfer report")
parser.add("root", path="dir", fix="run scripts/depth_sweep.sh first")
parser.add("--out", default="dev/depth_transfer", help="writes OUT.json, OUT.md and OUT.png")
args = parser.parse_args()


def load(root):
    """{(setup, rule, depth, mult, seed): final val_bpb}; the shared base-depth runs count for both rules."""
    res, settings = {}, set()
    for path in glob.glob(os.path.join(root, "*", "*", "d*", "m*", "s*", "metrics.jsonl")):
        setup, rule, d, m, s = path.split(os.sep)[-6:-1]
        last = json.loads(open(path).read().splitlines()[-1])
        a = json.load(open(os.path.join(os.path.dirname(path), "config.json")))["args"]
        if last.get("step") == a["num_iterations"] and "val_bpb" in last:
            res[setup, rule, int(d[1:]), float(m[1:]), int(s[1:])] = last["val_bpb"]
            settings.add(f"{setup}: width {a['n_embd']}, {a['num_iterations']} steps of {a['device_batch_size']} x "
                         f"{a['sequence_len']} tokens, base matrix LR {a['matrix_lr'] / 2 ** float(m[1:]):g}")
    depths = {}
    for setup, _, d, *_ in res:
        depths.setdefault(setup, set()).add(d)
    for (setup, _, d, m, s), v in list(res.items()):
        if d == min(depths[setup]):  # base depth: every depth factor is 1, the runs are the same
            res.setdefault((setup, "completep", d, m, s), v)
    return res, sorted(settings)


res, settings = load(args.root)
if not res:
    parser.error(f"root={args.root}: no finished runs under it")
rows, curves = [], {}
for setup, rule, d in sorted({k[:3] for k in res}):
    mults = sorted({k[3] for k in res if k[:3] == (setup, rule, d)})
    seeds = sorted({k[4] for k in res if k[:3] == (setup, rule, d)})
    full = [s for s in seeds if all((setup, rule, d, m, s) in res for m in mults)]
    mean = [statistics.mean(res[setup, rule, d, m, s] for s in full) for m in mults]
    opt = fit_optimum(mults, mean)
    edge = opt in (mults[0], mults[-1])
    per_seed = [fit_optimum(mults, [res[setup, rule, d, m, s] for m in mults]) for s in full]
    rows.append(dict(setup=setup, rule=rule, depth=d, seeds=len(full), mults=mults, mean_bpb=mean, opt=opt,
                     opt_at_edge=edge, opt_seed_sd=statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                     best_bpb=min(mean)))
    curves[setup, rule, d] = (mults, mean)
lines = [f"Depth LR transfer, {datetime.date.today()}: {len(res)} (setup, rule, depth, LR, seed) results (base-depth "
         f"runs count for both rules) from `python scripts/depth_sweep_report.py {args.root} --out {args.out}` (CPU). "
         + "; ".join(settings) + ".",
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
    ax.set_title(f"{setup}, {'CompleteP alpha=1' if rule == 'completep' else 'no depth rule'}", fontsize=9)
    ax.set_xlabel("log2 matrix LR multiplier", fontsize=8)
    ax.legend(fontsize=7)
axes[0][0].set_ylabel("final val bits per byte", fontsize=8)
fig.suptitle("depth LR transfer, width 128 (dotted: fitted optimum)", fontsize=9)
fig.tight_layout()
fig.savefig(args.out + ".png", dpi=90)
