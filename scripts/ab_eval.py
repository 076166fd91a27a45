"""
The one evaluator of the A/B against nanochat (scripts/ab_nanochat.py): bits per byte of a trained model over
every document of a val shard. Each document is scored from its own BOS in non-overlapping windows of T
targets, so every byte of the val text is scored exactly once whatever the tokenizer, and both repos are
measured by the same code on the same text.

    python scripts/ab_eval.py --repo ours --run RUN_DIR --val SHARD --out result.json
    python scripts/ab_eval.py --repo nanochat --checkout PATH --base-dir DIR --tag TAG --val SHARD --out result.json

Both repos' packages are called `nanochat`, so each model is scored in a process of its own: the adapter at the
bottom imports this repo's package or the checkout's (put first on sys.path). Nothing above it imports either.
"""

import argparse
import json
import math
import os
import sys

import pyarrow.parquet as pq
import torch


def windows(ids, T, pad):
    """(x, y) rows of length T covering ids[1:] exactly once as targets; short rows padded (targets -1)."""
    for i in range(0, len(ids) - 1, T):
        x, y = ids[i:i + T], ids[i + 1:i + T + 1]
        yield x + [pad] * (T - len(x)), y + [-1] * (T - len(y))


@torch.no_grad()
def score(loss_fn, encode, bos, docs, T, batch=16):
    """Bits per byte of `docs`: loss_fn(x, y) gives per-target nats (any shape, targets -1 ignored), encode(text)
    the token ids without BOS. The bytes are the documents' UTF-8 bytes (BOS has none)."""
    rows = [r for doc in docs for r in windows([bos] + encode(doc), T, bos)]
    nats, tokens = 0.0, 0
    for i in range(0, len(rows), batch):
        x = torch.tensor([r[0] for r in rows[i:i + batch]])
        y = torch.tensor([r[1] for r in rows[i:i + batch]])
        loss = loss_fn(x, y).reshape(y.shape).double()
        nats += torch.where(y >= 0, loss, 0.0).sum().item()  # where: ignored slots may hold anything
        tokens += int((y >= 0).sum())
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return dict(bpb=nats / (math.log(2) * n_bytes), nats=nats, bytes=n_bytes, tokens=tokens, docs=len(docs))


# -----------------------------------------------------------------------------
# adapters: load a trained model and its tokenizer from either repo


def load_ours(run):
    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import Tokenizer

    model, meta = load_model(run, torch.device("cpu"))
    tok = Tokenizer.load(meta["tokenizer_dir"])
    model.eval()
    return (lambda x, y: model(x, y, reduction="none")), tok.encode, tok.get_bos_token_id(), model.config.sequence_len


def load_nanochat(checkout, base_dir, tag):
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    sys.path.insert(0, os.path.abspath(checkout))
    from nanochat.checkpoint_manager import load_model_from_dir

    model, tok, meta = load_model_from_dir(os.path.join(base_dir, "base_checkpoints"), torch.device("cpu"), "eval",
                                           model_tag=tag)
    loss_fn = lambda x, y: model(x, y, loss_reduction="none")
    return loss_fn, tok.encode, tok.get_bos_token_id(), meta["model_config"]["sequence_len"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="bits per byte of a trained model over every val document")
    p.add_argument("--repo", required=True, choices=["ours", "nanochat"])
    p.add_argument("--run", help="ours: the base_train run directory")
    p.add_argument("--checkout", help="nanochat: the checkout")
    p.add_argument("--base-dir", help="nanochat: its NANOCHAT_BASE_DIR")
    p.add_argument("--tag", help="nanochat: the model tag (base_checkpoints/<tag>)")
    p.add_argument("--val", required=True, help="the val shard (parquet with a text column)")
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.repo == "ours":
        loss_fn, encode, bos, T = load_ours(args.run)
    else:
        loss_fn, encode, bos, T = load_nanochat(args.checkout, args.base_dir, args.tag)
    docs = pq.read_table(args.val, columns=["text"]).column("text").to_pylist()
    result = score(loss_fn, encode, bos, docs, T)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(result))
