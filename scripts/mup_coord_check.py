"""
muP coordinate check on Shakespeare bytes (Tensor Programs V, Yang et al. 2022): train each width a few real
optimizer steps in SP and muP, measure activation / weight / update sizes, fit log2-log2 slopes vs width
and compare with theory (muP_changes.md). Prints the slope table and a summary; saves records and a figure.

    python scripts/mup_coord_check.py --widths 64,128,256,512 --steps 10 --seeds 0,1,2 --setups muon,adamw
"""

import json
import os
import time

from nanochat.common import ArgParser

# -----------------------------------------------------------------------------------------------------
# args (both --some-option and --some_option spellings), checked before torch is imported

parser = ArgParser(description="muP coordinate check")
parser.add("--widths", default="64,128,256,512,1024", help="comma-separated widths, each a multiple of --head-dim")
parser.add("--steps", type=int, default=10, min=1)
parser.add("--seeds", default="0,1,2", help="comma-separated seeds")
parser.add("--setups", default="muon,adamw", help="matrix optimizers for hidden matrices: muon, adamw or both")
parser.add("--head-dim", type=int, default=32, min=1)
parser.add("--depth", type=int, default=2, min=1)
parser.add("--batch-size", type=int, default=8, min=1)
parser.add("--seq-len", type=int, default=64, min=2)
parser.add("--base-width", type=int, default=0, min=0, help="muP base width; 0 = the smallest width")
parser.add("--table-steps", default="0,1,2,5,10", help="steps shown in the table and checked")
parser.add("--out-dir", default="dev", path="out", help="where coord_check_<setup>.json and .png go")
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
if bad := [w for w in args.widths if w % args.head_dim]:  # n_head = width // head_dim: keep the head dim fixed
    parser.error(f"width {bad[0]} is not a multiple of --head-dim={args.head_dim}: pick widths that are")
if bad := set(args.setups.split(",")) - {"muon", "adamw"}:
    parser.error(f"--setups={args.setups}: {sorted(bad)[0]!r} is not a setup: pass muon, adamw or muon,adamw")

from nanochat.coord_check import (  # noqa: E402  (imports torch)
    deviation,
    fit_slopes,
    plot_coord_check,
    run_coord_check,
    slope_table,
)

# -----------------------------------------------------------------------------------------------------
# run, fit, print, save

os.makedirs(args.out_dir, exist_ok=True)
summary = {}
for setup in args.setups.split(","):
    t0 = time.time()
    recs = run_coord_check(args.widths, steps=args.steps, seeds=args.seeds, matrix_optimizer=setup,
                           base_width=args.base_width or None, head_dim=args.head_dim, depth=args.depth,
                           B=args.batch_size, T=args.seq_len)
    slopes = fit_slopes(recs)
    steps = [s for s in args.table_steps if s <= args.steps]
    rows = slope_table(slopes, setup, steps=steps)
    mup = [r for r in rows if r["mode"] == "mup" and r["check"] in ("PASS", "FAIL")]
    sp_blows = [r for r in rows if r["mode"] == "sp" and r["step"] >= 1 and r["check"] == "SP-FAIL"]
    act = [r for r in mup if r["quantity"].startswith("act/")]
    upd = [r for r in mup if r["quantity"].split("/")[0] in ("dw_rms", "dw_spec", "cond")]
    worst_act = max(abs(r["measured"]) for r in act)
    worst_upd = max(deviation(r["measured"], r["expected"]) for r in upd)
    sp_act = [abs(r["measured"]) for r in rows if r["mode"] == "sp" and r["step"] >= 1 and r["measured"] is not None
              and r["quantity"].startswith("act/")]
    sp_max = max(sp_act)
    s = dict(setup=setup, widths=args.widths, seeds=args.seeds, steps=args.steps, wall_s=round(time.time() - t0, 1),
             mup_pass=sum(r["check"] == "PASS" for r in mup), mup_checked=len(mup), mup_worst_act_slope=worst_act,
             mup_worst_update_dev=worst_upd, sp_blows=len(sp_blows), sp_max_act_slope=sp_max,
             sp_blows_examples=[f"{r['quantity']}@{r['step']}:{r['measured']:+.2f}" for r in sp_blows[:6]])
    summary[setup] = s
    print(json.dumps(s))
    with open(os.path.join(args.out_dir, f"coord_check_{setup}.json"), "w") as f:
        json.dump(dict(summary=s, table=rows), f, indent=0)
    plot_coord_check(recs, os.path.join(args.out_dir, f"coord_check_{setup}.png"),
                     steps=[s for s in (0, 1, args.steps // 2, args.steps) if s <= args.steps],
                     title=f"coord check, {setup} setup, widths {args.widths}, {len(args.seeds)} seeds, "
                     "Shakespeare bytes")
