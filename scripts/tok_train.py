"""
Train the BPE tokenizer on the train split of a data dir and save it (plus token_bytes.pt).
    python scripts/tok_train.py --vocab-size 4096
Idempotent: reruns with the same arguments reuse the saved tokenizer.
"""

import importlib.util
import json
import os
import time

from nanochat.common import ArgParser, atomic_write_text, get_base_dir
from nanochat.dataset import iter_documents
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir

parser = ArgParser(description="train the BPE tokenizer")
parser.add("--vocab-size", type=int, default=4096, min=256 + len(SPECIAL_TOKENS),
           help="including special tokens (256 byte tokens + specials at least)")
parser.add("--data-dir", default=None, path="dir", fix="run `python -m nanochat.dataset shakespeare` or pass the "
           "shards' directory", help="default: <base dir>/data/shakespeare")
parser.add("--max-chars", type=int, default=2_000_000_000, min=1,
           help="train on at most this many chars of the train split")
parser.add("--out", default=None, path="out", help="default: <base dir>/tokenizer/default")
args = parser.parse_args()
data_dir = os.path.abspath(args.data_dir or os.path.join(get_base_dir(), "data", "shakespeare"))
out = args.out or tokenizer_dir()

meta = {"data_dir": data_dir, "vocab_size": args.vocab_size, "max_chars": args.max_chars}
meta_path = os.path.join(out, "meta.json")
def saved_meta():
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)


if saved_meta() == meta:
    print(f"tokenizer in {out} is already trained with {meta}")
    tok = Tokenizer.load(out)
else:
    if importlib.util.find_spec("rustbpe") is None:  # only training needs it
        parser.error("training a tokenizer needs rustbpe, which is not installed: pip install rustbpe")

    def text_iterator():
        # the train split, capped at max_chars (the last doc is cut to fit)
        n = 0
        for text in iter_documents(data_dir, "train"):
            text = text[:args.max_chars - n]
            n += len(text)
            yield text
            if n >= args.max_chars:
                return

    t0 = time.time()
    try:
        tok = Tokenizer.train_from_iterator(text_iterator(), args.vocab_size)
    except (FileNotFoundError, ValueError) as e:  # no or too few shards: bad input, exit 2
        parser.error(" ".join(str(e).split()))
    print(f"trained a {tok.get_vocab_size()} token vocab in {time.time() - t0:.2f}s")
    if tok.get_vocab_size() < args.vocab_size:
        print(f"note: the text ran out of merges before --vocab-size={args.vocab_size}: use more text")
    tok.save(out)
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    print(f"saved to {out}")

# compression on the held-out split: more bytes per token = a better fit to the data
texts = list(iter_documents(data_dir, "val"))
n_tokens = sum(map(len, tok.encode(texts)))
n_bytes = sum(len(t.encode("utf-8")) for t in texts)
print(f"val: {len(texts)} docs, {n_bytes} bytes, {n_tokens} tokens, {n_bytes / n_tokens:.3f} bytes/token")
