"""
Causal / sliding-window attention with GQA in plain PyTorch: the reference that defines what the Triton kernel
(kernels/attention.py) computes, the mask it applies, and the predicate that says whether the kernel can run.
Never imports Triton.

Layout is the model's (B, T, H, D). K/V have H_kv heads with H_kv | H; query head h reads kv head h // (H / H_kv).
`window` is the number of past positions a query sees besides itself: query i attends keys j with
i - window <= j <= i. `sliding_window_mask` builds that mask for F.scaled_dot_product_attention.
"""

import torch

from kernels import triton_unavailable

HEAD_DIMS = (32, 64, 128)  # the kernel's launch configs are built for these (tl.arange needs a power of 2)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sliding_window_mask(T, window=None, device=None):
    """(T, T) bool mask, True = attend: causal, and at most `window` positions back."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (j >= i - window)
    return mask


def attention_reference(q, k, v, *, scale, causal=True, window=None):
    """Plain PyTorch attention with explicit masking (any dtype, fp64 included)."""
    check_args(q, k, v, causal, window)
    group = q.size(2) // k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        mask = sliding_window_mask(q.size(2), window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def check_args(q, k, v, causal, window):
    assert q.dim() == 4 and k.shape == v.shape, "expected q (B, T, H, D), k and v (B, T, H_kv, D)"
    B, T, H, D = q.shape
    assert k.shape[0] == B and k.shape[1] == T and k.shape[3] == D, f"q {q.shape} vs k {k.shape}"
    assert H % k.size(2) == 0, f"n_kv_head ({k.size(2)}) must divide n_head ({H})"
    if window is not None:
        assert causal, "a sliding window is only defined for causal attention"
        assert window >= 0, f"window must be >= 0, got {window}"


def compute_dtype(q, k, v):
    """The dtype the kernel runs in: autocast's (a custom op gets no autocast casts, so do what autocast
    does for SDPA: cast q, k, v to its dtype), else the inputs' common dtype (None if they differ)."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype if q.dtype == k.dtype == v.dtype else None


def unsupported(device_type, dtype, head_dim, auto=False):
    """Why the Triton kernel cannot run this case (one phrase naming it), or None if it can. The case is judged
    before the machine, so a case the kernel lacks is named the same on CPU and GPU. auto=True: also float32, which
    `auto` leaves to SDPA: the fp32 tiles are 16-64 rows with three tf32 products per product (tf32x3), kept for
    `triton` and for base_train's timed choice (nanochat/kernel_choice.py)."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim={head_dim} (the kernels support {', '.join(map(str, HEAD_DIMS))})"
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernels support float32, bfloat16, float16)"
    if auto and dtype == torch.float32:
        return "float32 under auto (it takes the kernel for bfloat16 and float16 only)"
    return triton_unavailable(device_type)
