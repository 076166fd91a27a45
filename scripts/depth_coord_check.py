"""
Depth coordinate check (CompleteP, Dey et al. 2025): at a fixed width, train each depth a few real optimizer
steps on Shakespeare bytes with and without the depth rule, and fit log2-log2 slopes vs depth of the residual
stream, its change since init, the per-layer updates (in units of a layer's 1/L share) and the logits. Flat
(slope ~0) with the rule, growing without. Saves dev/depth_coord_check_<setup>.json and .png.

    python scripts/depth_coord_check.py --depths 2,4,8,16 --steps 10 --seeds 0,1,2 --setups muon,adamw
"""

import json
import os
import time

from nanochat.common import ArgParser

parser = ArgParser(description="depth coordinate check")
parser.add("--depths", default="2,4,8,16", help="comma-separated depths; the first is the base depth")
parser.add("--width", type=int, default=128, min=2)
parser.add("--head-dim", type=int, default=32, min=2)
parser.add("--alpha", type=float, default=1.0, min=0.5, max=1, help="depth exponent of the rule (1 = CompleteP)")
parser.add("--steps", type=int, default=10, min=2)
parser.add("--seeds", default="0,1,2", help="comma-separated seeds")
parser.add("--setups", default="muon,adamw", help="matrix optimizers: muon, adamw or both")
parser.add("--out-dir", default="dev", path="out", help="where the json and png go")
args = parser.parse_args()


def ints(flag, text, lo):
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < lo:
        parser.error(f"{flag}={text}: pass comma-separated integers >= {lo}, e.g. {flag} {lo},{2 * max(lo, 1)}")
    return vals


depths, seeds = ints("--depths", args.depths, 1), ints("--seeds", args.seeds, 0)
if len(depths) < 2:
    parser.error(f"--depths={args.depths}: slopes need at least two depths")
if args.width % args.head_dim:
    parser.error(f"--width={args.width} is not a multiple of --head-dim={args.head_dim}")
if bad := set(args.setups.split(",")) - {"muon", "adamw"}:
    parser.error(f"--setups={args.setups}: {sorted(bad)[0]!r} is not a setup: pass muon, adamw or muon,adamw")

from nanochat.depth_check import QUANTITIES, plot_depth_check, run_depth_check, slopes  # noqa: E402

os.makedirs(args.out_dir, exist_ok=True)
show = sorted({2, args.steps // 2, args.steps})
for setup in args.setups.split(","):
    t0 = time.time()
    recs = run_depth_check(depths, rules=(0, args.alpha), steps=args.steps, seeds=seeds, matrix_optimizer=setup,
                           width=args.width, base_depth=depths[0])
    table = {f"{'completep' if rule else 'none'}/{q}@{step}": round(v, 3)
             for step in show for (rule, q), v in sorted(slopes(recs, step).items())}
    for step in show:
        print(f"{setup} step {step}: " + "  ".join(
            f"{q} {table[f'none/{q}@{step}']:+.2f} -> {table[f'completep/{q}@{step}']:+.2f}" for q in QUANTITIES))
    summary = dict(setup=setup, depths=depths, width=args.width, head_dim=args.head_dim, alpha=args.alpha,
                   base_depth=depths[0], steps=args.steps, seeds=seeds, wall_s=round(time.time() - t0, 1),
                   slopes_vs_depth=table)
    with open(os.path.join(args.out_dir, f"depth_coord_check_{setup}.json"), "w") as f:
        json.dump(dict(summary=summary, records=recs), f, indent=0)
    plot_depth_check(recs, os.path.join(args.out_dir, f"depth_coord_check_{setup}.png"), show,
                     title=f"depth coord check, {setup} setup, width {args.width}, base depth {depths[0]}, "
                     f"{len(seeds)} seeds, Shakespeare bytes (log2-log2 vs depth)")
