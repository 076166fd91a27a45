"""
One short LR-transfer training run on Shakespeare bytes; appends its JSON row to a results JSONL file.

    python -m scripts.mup_transfer --width 256 --mode mup --lr-log2 -1 --seed 0 --steps 80 --setup muon

The LR multiplier 2^lr_log2 scales every LR (see nanochat/transfer.py). Skips the run if a row with the same
key (setup, mode, width, lr_log2, output_mult, seed, steps, depth, head_dim, B, T, base_width) is present.
"""

import time

from nanochat.common import ArgParser

# -----------------------------------------------------------------------------------------------------
# args (both --some-option and --some_option spellings), checked before torch is imported

parser = ArgParser(description="one muP/SP LR-transfer run")
parser.add("--width", type=int, default=64, min=1)
parser.add("--mode", choices=["sp", "mup"], default="mup")
parser.add("--lr-log2", type=float, default=0.0, min=-60, max=60, help="log2 of the multiplier on all LRs")
parser.add("--output-mult", type=float, default=1.0, above=0, help="muP output multiplier (the second transferred HP)")
parser.add("--seed", type=int, default=0, min=0, max=2**63 - 1)
parser.add("--steps", type=int, default=80, min=1)
parser.add("--setup", choices=["muon", "adamw"], default="muon", help="matrix optimizer for hidden matrices")
parser.add("--depth", type=int, default=2, min=1)
parser.add("--base-depth", type=int, default=0, min=0,
           help="depth the base was tuned at (0 = --depth; another depth is refused)")
parser.add("--head-dim", type=int, default=32, min=1)
parser.add("--batch-size", type=int, default=8, min=1)
parser.add("--seq-len", type=int, default=64, min=2)
parser.add("--base-width", type=int, default=64, min=1)
parser.add("--out", default="dev/transfer_lr.jsonl", path="outfile", help="results JSONL")
args = parser.parse_args()
if args.width % args.head_dim:  # n_head = width // head_dim: any other width would silently change the head dim
    parser.error(f"--width={args.width} is not divisible by --head-dim={args.head_dim}: pick a multiple of it")

from nanochat.coord_check import build_model  # noqa: E402  (imports torch)
from nanochat.transfer import append_row, read_rows, row_key, train_once  # noqa: E402

try:  # refuse, with one line, a target the parametrization does not cover (GPTConfig's check)
    build_model(args.width, args.mode == "mup", args.base_width, args.head_dim, args.depth, device="meta",
                base_depth=args.base_depth)
except ValueError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")

# -----------------------------------------------------------------------------------------------------
# skip if done, else train and append

key = dict(setup=args.setup, mode=args.mode, width=args.width, lr_log2=float(args.lr_log2),
           output_mult=float(args.output_mult), seed=args.seed, steps=args.steps, depth=args.depth,
           head_dim=args.head_dim, B=args.batch_size, T=args.seq_len, base_width=args.base_width)
if row_key(key) in {row_key(r) for r in read_rows(args.out)}:
    print(f"skip (done): {key}")
    raise SystemExit(0)
t0 = time.time()
row = train_once(width=args.width, mode=args.mode, lr_log2=args.lr_log2, seed=args.seed, steps=args.steps,
                 setup=args.setup, output_mult=args.output_mult, depth=args.depth, head_dim=args.head_dim,
                 B=args.batch_size, T=args.seq_len, base_width=args.base_width, base_depth=args.base_depth)
row["wall_s"] = round(time.time() - t0, 2)
append_row(args.out, row)
print(f"{args.setup} {args.mode} w={args.width} lr_log2={args.lr_log2:+g} om={args.output_mult:g} seed={args.seed}: "
      f"train {row['train_loss']:.4f} val {row['val_loss']:.4f} ({row['wall_s']:.1f}s)")
