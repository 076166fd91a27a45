"""
Generate text from a trained run's checkpoint.

    python scripts/sample.py --run runs/base --prompt "ROMEO:" --max-tokens 100
"""

import torch

from nanochat.checkpoint import load_model
from nanochat.common import ArgParser
from nanochat.tokenizer import Tokenizer

parser = ArgParser(description="sample from a checkpoint")
parser.add("--run", required=True, help="run directory written by base_train.py")
parser.add("--step", type=int, default=None, help="checkpoint step (default: latest)")
parser.add("--prompt", default="", help="text to continue (default: start of a document)")
parser.add("--max-tokens", type=int, default=100)
parser.add("--temperature", type=float, default=0.8, help="0 = greedy")
parser.add("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
parser.add("--num-samples", type=int, default=1)
parser.add("--seed", type=int, default=42)
parser.add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()
if args.max_tokens <= 0 or args.temperature < 0 or args.top_k < 0 or args.num_samples <= 0:
    parser.error(f"--max-tokens={args.max_tokens}, --temperature={args.temperature}, --top-k={args.top_k}, "
                 f"--num-samples={args.num_samples}: need max-tokens > 0, temperature >= 0, top-k >= 0, samples > 0")
try:
    model, meta = load_model(args.run, args.device, args.step)
    tokenizer = Tokenizer.load(meta["tokenizer_dir"])
except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
model.eval()
ids = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
for i in range(args.num_samples):
    out = model.generate(ids, args.max_tokens, args.temperature, args.top_k or None, seed=args.seed + i)
    print(f"--- sample {i + 1} (step {meta['step']}) ---")
    print(tokenizer.decode(ids[1:] + out))
