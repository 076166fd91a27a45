"""
Report of one or more hyperparameter-transfer sweeps (scripts/sweep.sh directories, one hyperparameter each):
loss vs log2 multiplier per width (per batch, per horizon for sweeps with those axes) as PNG, the fitted optimum
per point of the axis with a 95% bootstrap interval over seeds, the slope of the log2 optimum against log2 width
(batch, tokens) with its interval, the wider-is-better check, and the recommended hyperparameters for a target
as a ready base_train command line (from the muP runs of the width sweeps), with the batch and horizon rules
(nanochat/scaling.py) from the sweeps' batch and tokens to the target's.

    python scripts/transfer_report.py runs/sweep_matrix_lr runs/sweep_unembedding_lr --target-width 1024 \
        --target-depth 8 --target-ratio 12 --target-batch auto

Writes to --out (default: the first DIR): transfer_<hp>[_vs_<axis>].png per sweep and axis, report.md, report.json.
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
parser.add("--target-depth", type=int, default=0, min=0, help="depth of the target (0 = the sweeps')")
parser.add("--depth-alpha", type=float, default=0, min=0, max=1,
           help="depth rule for a target depth other than the sweeps' (0 = none; 1 = CompleteP)")
parser.add("--target-tokens", type=int, default=0, min=0, help="training tokens of the target (0 = the sweeps' steps)")
parser.add("--target-ratio", type=float, default=0, min=0,
           help="training tokens of the target as tokens per scaling parameter (nanochat's 12; 0 = off)")
parser.add("--target-batch", default="0",
           help="tokens per step of the target (0 = the sweeps'; auto: Power Lines from the sweeps' batch and tokens)")
parser.add("--batch-lr-scaling", type=float, default=0.5, min=0, help="exponent of the LR batch rule (0 = off)")
parser.add("--wd-scaling", type=int, default=1, choices=[0, 1], help="the weight-decay timescale rule (0 = off)")
parser.add("--n-boot", type=int, default=1000, min=1, help="bootstrap resamples of the seeds")
parser.add("--out", default="", path="out", help="report directory (default: the first DIR)")
args = parser.parse_args()
for d in args.dirs:
    if not os.path.isfile(os.path.join(d, "sweep.json")):
        parser.error(f"{d}: no sweep.json: pass a directory written by scripts/sweep.sh")
if args.target_batch != "auto" and not args.target_batch.isdigit():
    parser.error(f"--target-batch={args.target_batch}: pass a number of tokens, 0 (the sweeps') or auto")
if args.target_tokens and args.target_ratio:
    parser.error("--target-tokens and --target-ratio both set the horizon: pass one of them")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanochat.scaling import auto_batch, describe, factors  # noqa: E402
from nanochat.transfer import drop_options, read_runs, recommend, summarize, swept_options, varied  # noqa: E402

out_dir = args.out or args.dirs[0]
os.makedirs(out_dir, exist_ok=True)


def fmt(v, ci=None):
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci and all(map(math.isfinite, ci)) else "")


def label(key, s):
    """'mup depth 2' plus the other varied axes' values of a summary group."""
    return " ".join([key[0], f"depth {key[1]}", *(f"{a} {v}" for a, v in s["fixed"].items())])


def plot(meta, summary, path):
    keys = sorted(summary)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False, sharey=True)
    finite = [y for s in summary.values() for ys in s["means"] for y in ys if math.isfinite(y)]
    lo, hi = min(finite), min(max(finite), min(finite) + 1.0)
    cmap = plt.get_cmap("viridis")
    for ax, key in zip(axes[0], keys):
        s = summary[key]
        for i, v in enumerate(s["values"]):
            color = cmap(i / max(1, len(s["values"]) - 1))
            ys = [y if math.isfinite(y) else float("nan") for y in s["means"][i]]
            ax.plot(s["xs"][i], ys, color=color, marker="o", ms=3, lw=1,
                    label=f"{s['axis']} {v} (opt {fmt(s['optima'][i])})")
            if math.isfinite(s["optima"][i]):
                ax.axvline(s["optima"][i], color=color, ls=":", lw=0.8)
        ax.set_title(f"{label(key, s)}: slope vs log2 {s['axis']} {fmt(s['slope'], s['slope_ci'])}", fontsize=7)
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
    # a second sweep of one hyperparameter (a tuning pass with the other groups at their tuned values) gets its own
    # key and plot, and overrides the first in the recommendation, as in payoff.py
    n = sum(k == meta["hp"] or k.startswith(meta["hp"] + "_pass") for k in report)
    key = f"{meta['hp']}_pass{n + 1}" if n else meta["hp"]
    widest = max(widest, max(r["width"] for r in rows))
    report[key] = dict(dir=d, meta=meta, summary={}, along={})
    lines += [f"## {key} ({d})", "", f"Base {meta['base']}; base_train options: `{shlex.join(meta['extra'])}`; "
              f"{len(rows)} runs ({sum(r['diverged'] for r in rows)} diverged); metric {args.metric}.", ""]
    axes = varied(rows) or ["width"]
    for axis in axes:
        summary = summarize(rows, args.metric, args.n_boot, axis=axis)
        tag = key if axis == "width" else f"{key}_vs_{axis}"
        png = os.path.join(out_dir, f"transfer_{tag}.png")
        plot(meta, summary, png)
        lines += [f"Optimum along {axis} (plot `{os.path.basename(png)}`):", "",
                  f"| group | {axis} | seeds | fitted optimum (log2) [95% CI] | best loss |", "|---|---|---|---|---|"]
        for k, s in sorted(summary.items()):
            for i, v in enumerate(s["values"]):
                lines.append(f"| {label(k, s)} | {v} | {s['n_seeds'][i]} | {fmt(s['optima'][i], s['optima_ci'][i])} "
                             f"| {s['best'][i]:.4f} |")
        lines.append("")
        for k, s in sorted(summary.items()):
            lines.append(f"- {label(k, s)}: slope of log2 optimum vs log2 {axis} {fmt(s['slope'], s['slope_ci'])}; "
                         f"best loss falls along {axis}: {s['best_falls']}")
        lines.append("")
        named = {label(k, s): s for k, s in summary.items()}
        if axis == "width":
            report[key]["summary"], by_width = named, summary
        else:
            report[key]["along"][axis] = named
    mup = sorted(k for k in by_width if k[0] == "mup") if axes == ["width"] else []
    if axes != ["width"]:
        lines += [f"{d} sweeps batch or horizon: it measures the rules and sets no recommendation.", ""]
    elif mup:  # the muP runs, at the first depth (no depth rule yet)
        base_width = next(r["base_width"] for r in rows if r["mode"] == "mup")
        recs.pop(meta["hp"], None)  # re-inserted last: the command lists the groups in the order of their last pass
        recs[meta["hp"]] = (key, meta, by_width[mup[0]], mup[0][1], base_width, rows[0])
    else:
        lines += [f"No muP runs in {d}: nothing to recommend for {meta['hp']}.", ""]

# -----------------------------------------------------------------------------------------------------
# recommendation: every swept hyperparameter at its transferred value, the others as in the (first) sweep



def target_scaling_params(run, width, depth):
    """Scaling parameters (nanochat/scaling.py) of the target: the run's model at the target width and depth."""
    from nanochat.gpt import GPTConfig, build_model  # torch: only for a horizon in tokens per parameter

    mc = json.load(open(os.path.join(run, "config.json")))["model_config"]
    heads, kv = width // (mc["n_embd"] // mc["n_head"]), mc["n_head"] // mc["n_kv_head"]
    cfg = GPTConfig(n_embd=width, n_head=heads, n_kv_head=heads // kv, n_layer=depth,  # the counted shapes only
                    **{k: mc[k] for k in ("sequence_len", "vocab_size", "pad_vocab_to", "value_embeds")})
    return build_model(cfg, "meta").num_scaling_params()


def shape_rules(first_row, width, depth):
    """base_train options and explanation lines that take the proxy's batch and horizon to the target's."""
    ref_b, ref_t = first_row["batch"], first_row["tokens"]
    tokens = args.target_tokens or ref_t
    if args.target_ratio:
        tokens = round(args.target_ratio * target_scaling_params(first_row["run"], width, depth))
    batch = int(args.target_batch) if args.target_batch != "auto" else auto_batch(tokens, ref_b, ref_t)
    batch = batch or ref_b
    trained = math.ceil(tokens / batch) * batch  # base_train trains whole steps
    f = factors(batch, trained, ref_b, ref_t, args.batch_lr_scaling, bool(args.wd_scaling))
    why = [f"horizon {trained:,} tokens ({trained // batch} steps x {batch:,}); proxy {ref_b:,} x {ref_t:,} tokens"]
    if args.target_batch == "auto":
        why.append(f"batch {batch:,}: Power Lines from the proxy, 2^round(log2({ref_b:,} x ({tokens:,} / {ref_t:,})"
                   "^0.383))")
    opts = ["--total-batch-size", str(batch), "--target-tokens", str(tokens), "--ref-batch-size", str(ref_b),
            "--ref-tokens", str(ref_t), "--batch-lr-scaling", f"{args.batch_lr_scaling:g}", "--wd-scaling",
            str(args.wd_scaling)]
    return opts, why + describe(batch, trained, ref_b, ref_t, args.batch_lr_scaling, bool(args.wd_scaling), f)


target = args.target_width or 4 * widest
cmd = None
if recs:
    rec_args = []
    first = next(iter(recs.values()))
    for key, meta, s, _, _, _ in recs.values():
        x, how = recommend(s, first[4], target)
        report[key].update(recommended_log2=x, recommended_how=how)
        if math.isfinite(x):
            rec_args += [a for o, v in meta["base"].items() for a in (o, f"{v * 2.0 ** x:.4g}")]
        lines.append(f"- {key}: recommended log2 multiplier at width {target}: {fmt(x)} ({how})")
    _, meta, _, depth, base_width, row = first
    if any((drop_options(m["extra"], swept), bw, (r["batch"], r["tokens"])) !=
           (drop_options(meta["extra"], swept), base_width, (row["batch"], row["tokens"]))
           for _, m, _, _, bw, r in recs.values()):
        lines.append("- WARNING: the sweeps differ in base_train options, base width, batch or tokens: the command "
                     "uses the first's")
    tdepth = args.target_depth or depth
    depth_opts = ["--mup-base-depth", str(depth), "--depth-alpha", f"{args.depth_alpha:g}"] * (
        tdepth != depth and args.depth_alpha > 0)
    shape_opts, why = [], []
    if args.target_batch != "0" or args.target_tokens or args.target_ratio:
        shape_opts, why = shape_rules(row, target, tdepth)
    owned = set(rec_args[::2]) | set(shape_opts[::2]) | {"--depth"} | (
        {"--num-iterations", "--target-tokens", "--target-param-data-ratio", "--target-flops"} if shape_opts else set())
    cmd = shlex.join(["python", "scripts/base_train.py", "--n-embd", str(target), "--depth", str(tdepth),
                      "--mup-base-width", str(base_width), *depth_opts, *drop_options(meta["extra"], owned),
                      *shape_opts, *rec_args])
    lines += ["", f"Recommended base_train command for width {target}, depth {tdepth} (muP, base width "
              f"{base_width}):", "", f"    {cmd}", ""]
    if why:
        lines += ["Batch and horizon rules (nanochat/scaling.py), applied by base_train to the values above:", "",
                  *(f"- {w}" for w in why), ""]
open(os.path.join(out_dir, "report.md"), "w").write("# Transfer report\n\n" + "\n".join(lines))
json.dump(dict(metric=args.metric, target_width=target, command=cmd, rules=why if recs else [], sweeps=report),
          open(os.path.join(out_dir, "report.json"), "w"), indent=1)
print("\n".join(lines))
print(f"wrote {out_dir}/report.md, report.json and the plots")
