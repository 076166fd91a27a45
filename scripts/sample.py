"""
Generate text from a trained run's checkpoint.

    python scripts/sample.py --run runs/base --prompt "ROMEO:" --max-tokens 100

Exit codes: 0 done; 2 bad input (one line on stderr, checked before torch is imported); 3 the checkpoint's weights
or the logits are not finite (one line).
"""

import math
import sys

from nanochat.common import ArgParser

parser = ArgParser(description="sample from a checkpoint")
parser.add("--run", required=True, path="dir", fix="pass a run directory written by scripts/base_train.py",
           help="run directory written by base_train.py")
parser.add("--step", type=int, default=None, min=1, help="checkpoint step (default: latest)")
parser.add("--prompt", default="", help="text to continue (default: start of a document)")
parser.add("--max-tokens", type=int, default=100, min=1)
parser.add("--temperature", type=float, default=0.8, min=0, help="0 = greedy")
parser.add("--top-k", type=int, default=50, min=0, help="sample among the k most likely tokens (0 = all)")
parser.add("--num-samples", type=int, default=1, min=1)
parser.add("--seed", type=int, default=42, min=0, max=2**63 - 1)
parser.add("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda > mps > cpu")
args = parser.parse_args()

from nanochat.checkpoint import load_model  # noqa: E402  (the options are checked first: a bad one fails fast)
from nanochat.common import compute_setup  # noqa: E402
from nanochat.engine import generate  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402

try:
    device, _, _ = compute_setup(args.device, "float32")
    model, meta = load_model(args.run, device, args.step)
    tokenizer = Tokenizer.load(meta["tokenizer_dir"])
except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))


def non_finite(what):
    print(f"{what}: not sampling (exit 3)", file=sys.stderr)
    sys.exit(3)


# base_train never saves non-finite weights, but a checkpoint may come from elsewhere
worst = max(p.detach().abs().max().item() for p in model.parameters())
if not math.isfinite(worst):
    non_finite(f"{args.run} step {meta['step']}: the checkpoint holds non-finite weights")
model.eval()
ids = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
for i in range(args.num_samples):
    try:
        out = generate(model, ids, args.max_tokens, args.temperature, args.top_k or None, seed=args.seed + i)
    except RuntimeError as e:  # torch.multinomial refuses nan/inf probabilities
        if "probability tensor" not in str(e):
            raise
        non_finite(f"{args.run} step {meta['step']}: non-finite logits while sampling")
    print(f"--- sample {i + 1} (step {meta['step']}) ---")
    print(tokenizer.decode(ids[1:] + out))
