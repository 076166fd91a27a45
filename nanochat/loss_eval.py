"""Bits per byte: a loss that does not depend on the tokenizer's vocab size."""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Average bits per byte over `steps` batches of (x, y) from the iterable `batches`.
    model(x, y, reduction='none') must return (B, T) per-token losses in nats (targets -1 ignored).
    Tokens with byte length 0 (special tokens such as BOS) are left out. Sums are all-reduced across ranks."""
    it = iter(batches)
    total_nats = total_bytes = None
    for _ in range(steps):
        x, y = next(it)
        loss = model(x, y, reduction="none").reshape(-1).double()
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes.to(y.device)[y.clamp(min=0)], 0).long()
        # where, not multiply: the loss may be nan at ignored slots
        nats = torch.where(nbytes > 0, loss, 0.0).sum()
        total_nats = nats if total_nats is None else total_nats + nats
        total_bytes = nbytes.sum() if total_bytes is None else total_bytes + nbytes.sum()
    if total_nats is None:
        raise ValueError(f"steps={steps}: need at least 1 eval step")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        raise ValueError("the eval batches contain no bytes (only special tokens): "
                         "check the data and token_bytes")
    return total_nats.item() / (math.log(2) * total_bytes)
