"""
muP coordinate check on Shakespeare bytes (Tensor Programs V, Yang et al. 2022): train each width a few real
optimizer steps in SP and muP, measure activation / weight / update sizes, fit log2-log2 slopes vs width
and compare with theory (muP_changes.md). Prints the slope table and a summary; saves records and a figure.
Also checks one Muon step per matrix: ||dW||_2 must scale like sqrt(fan_out/fan_in) across widths.

    python scripts/mup_coord_check.py --widths 64,128,256,512 --steps 10 --seeds 0,1,2 --setups muon,adamw
    python scripts/mup_coord_check.py --n-kv-head 1 --tag gqa        # GQA with one kv head at every width
    python scripts/mup_coord_check.py --n-head 2 --tag headdim       # width through head_dim (2 heads)
"""

import json
import os
import time

from nanochat.common import ArgParser

# -----------------------------------------------------------------------------------------------------
# args (both --some-option and --some_option spellings), checked before torch is imported

parser = ArgParser(description="muP coordinate check")
parser.add("--widths", default="64,128,256,512,1024", help="comma-separated widths")
parser.add("--steps", type=int, default=10, min=1)
parser.add("--seeds", default="0,1,2", help="comma-separated seeds")
parser.add("--setups", default="muon,adamw", help="matrix optimizers for hidden matrices: muon, adamw or both")
parser.add("--head-dim", type=int, default=32, min=1, help="fixed head_dim (width grows through heads) unless --n-head")
parser.add("--n-head", type=int, default=0, min=0, help="fixed number of heads: width grows through head_dim (0 = off)")
parser.add("--n-kv-head", type=int, default=0, min=0, help="fixed number of kv heads at every width (0 = MHA)")
parser.add("--weight-decay", type=float, default=0.0, min=0)
parser.add("--depth", type=int, default=2, min=1)
parser.add("--base-depth", type=int, default=0, min=0,
           help="depth the base was tuned at (0 = --depth; another depth is refused)")
parser.add("--batch-size", type=int, default=8, min=1)
parser.add("--seq-len", type=int, default=64, min=2)
parser.add("--base-width", type=int, default=0, min=0, help="muP base width; 0 = the smallest width")
parser.add("--table-steps", default="0,1,2,5,10", help="steps shown in the table and checked")
parser.add("--tag", default="", help="suffix of the output files: coord_check_<setup>[_<tag>].json/.png")
parser.add("--out-dir", default="dev", path="out", help="where the json and png go")
args = parser.parse_args()


def ints(flag, text, lo, n=1):
    """Comma-separated integers >= lo, at least n of them, or a one-line error."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) < n or min(vals) < lo:
        parser.error(f"{flag}={text}: pass at least {n} comma-separated integers >= {lo}, e.g. {flag} "
                     + ",".join(str(lo + i) for i in range(max(n, 2))))
    return vals


args.widths = ints("--widths", args.widths, 1, n=2)  # slopes need two widths
args.seeds = ints("--seeds", args.seeds, 0)
args.table_steps = ints("--table-steps", args.table_steps, 0)
# width grows through heads (n_head = width // head_dim) or, with --n-head, through head_dim
unit, flag = (args.n_head, "--n-head") if args.n_head else (args.head_dim, "--head-dim")
if bad := [w for w in args.widths if w % unit]:
    parser.error(f"width {bad[0]} is not a multiple of {flag}={unit}: pick widths that are")
if bad := set(args.setups.split(",")) - {"muon", "adamw"}:
    parser.error(f"--setups={args.setups}: {sorted(bad)[0]!r} is not a setup: pass muon, adamw or muon,adamw")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nanochat.coord_check import (  # noqa: E402
    coord_config,
    deviation,
    fit_slopes,
    muon_step_spectral,
    param_kind,
    plot_coord_check,
    run_coord_check,
    shape_slopes,
    slope_table,
)
from nanochat.gpt import build_model  # noqa: E402

base_width = args.base_width or min(args.widths)
model_kw = dict(head_dim=args.head_dim, n_head=args.n_head, n_kv_head=args.n_kv_head, depth=args.depth)
try:  # refuse, with one line, a target the parametrization does not cover (or an invalid base)
    coord_config(base_width, True, base_width, base_depth=args.base_depth, **model_kw)
except ValueError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")

# -----------------------------------------------------------------------------------------------------
# one Muon step per matrix: ||dW||_2 vs sqrt(fan_out / fan_in) across widths (muP rules)

spec, fan_ratio = {}, {}
for width in args.widths:
    torch.manual_seed(0)
    model = build_model(coord_config(width, True, base_width, **model_kw))
    for name, s in model.param_shapes().items():
        if s["role"] == "matrix":
            fan_ratio.setdefault(param_kind(name, "matrix"), {})[width] = s["fan_out"] / s["fan_in"]
    for kind, v in muon_step_spectral(model, model.setup_optimizer(matrix_optimizer="muon")).items():
        spec.setdefault(kind, []).append(v)
muon_step = {}
lw = np.log2(args.widths)
for kind, norms in spec.items():
    measured = float(np.polyfit(lw, np.log2(norms), 1)[0])
    expected = float(np.polyfit(lw, [0.5 * np.log2(fan_ratio[kind][w]) for w in args.widths], 1)[0])
    muon_step[kind] = dict(measured=measured, expected=expected, dw_spec_over_lr=norms)
    print(f"muon step ||dW||_2 {kind:<12} slope {measured:+.3f} (sqrt(fan_out/fan_in): {expected:+.3f})")

# -----------------------------------------------------------------------------------------------------
# coordinate check: run, fit, print, save

os.makedirs(args.out_dir, exist_ok=True)
suffix = f"_{args.tag}" if args.tag else ""
for setup in args.setups.split(","):
    t0 = time.time()
    recs = run_coord_check(args.widths, steps=args.steps, seeds=args.seeds, matrix_optimizer=setup,
                           base_width=base_width, B=args.batch_size, T=args.seq_len, weight_decay=args.weight_decay,
                           **model_kw)
    slopes = fit_slopes(recs)
    steps = [s for s in args.table_steps if s <= args.steps]
    rows = slope_table(slopes, setup, steps=steps, decay=args.weight_decay > 0)
    mup = [r for r in rows if r["mode"] == "mup" and r["check"] in ("PASS", "FAIL")]
    sp_blows = [r for r in rows if r["mode"] == "sp" and r["step"] >= 1 and r["check"] == "SP-FAIL"]
    act = [r for r in mup if r["quantity"].startswith("act/") and r["step"] >= 1]
    upd = [r for r in mup if r["quantity"].split("/")[0] in ("dw_rms", "dw_spec", "cond")]
    worst_act = max(deviation(r["measured"], r["expected"]) for r in act)
    worst_upd = max(deviation(r["measured"], r["expected"]) for r in upd)
    sp_act = [abs(r["measured"]) for r in rows if r["mode"] == "sp" and r["step"] >= 1 and r["measured"] is not None
              and r["quantity"].startswith("act/")]
    s = dict(setup=setup, tag=args.tag, widths=args.widths, seeds=args.seeds, steps=args.steps,
             head_dim=args.head_dim, n_head=args.n_head, n_kv_head=args.n_kv_head, weight_decay=args.weight_decay,
             depth=args.depth, batch_size=args.batch_size, seq_len=args.seq_len, base_width=base_width,
             shape_slopes={k: v for k, v in shape_slopes(slopes).items()}, wall_s=round(time.time() - t0, 1),
             mup_pass=sum(r["check"] == "PASS" for r in mup), mup_checked=len(mup),
             mup_failed=[f"{r['quantity']}@{r['step']}:{r['measured']:+.2f}" for r in mup if r["check"] == "FAIL"],
             mup_worst_act_dev=worst_act, mup_worst_update_dev=worst_upd, sp_blows=len(sp_blows),
             sp_max_act_slope=max(sp_act),
             sp_blows_examples=[f"{r['quantity']}@{r['step']}:{r['measured']:+.2f}" for r in sp_blows[:8]])
    print(json.dumps(s))
    with open(os.path.join(args.out_dir, f"coord_check_{setup}{suffix}.json"), "w") as f:
        json.dump(dict(summary=s, muon_step=muon_step, table=rows,
                       slopes=[[*k, v] for k, v in sorted(slopes.items(), key=lambda kv: kv[0])]), f, indent=0)
    plot_coord_check(recs, os.path.join(args.out_dir, f"coord_check_{setup}{suffix}.png"),
                     steps=[s for s in (0, 1, args.steps // 2, args.steps) if s <= args.steps],
                     title=f"coord check, {setup} setup{', ' + args.tag if args.tag else ''}, widths {args.widths}, "
                     f"{len(args.seeds)} seeds, Shakespeare bytes")
