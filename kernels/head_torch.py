"""
Output head without Triton: lm_head matmul + muP logit multiplier + tanh softcap + cross-entropy.

    logits = softcap * tanh((x @ W.T * logit_mult) / softcap)    (softcap == 0: no cap)
    loss   = cross_entropy(logits, targets, ignore_index, reduction)

The (tokens x vocab) fp32 logits dominate training memory. Following Liger-Kernel's fused linear
cross-entropy (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"), tokens
are processed in chunks: each chunk's logits are computed, turned into dlogits in place, and
immediately consumed by the two gradient matmuls, so grad_x / grad_W are ready at the end of the
forward and only a (chunk x vocab) buffer ever lives. The backward just rescales by the incoming
gradient. Exception: reduction='none' needs per-row output grads to form grad_W, so its forward
computes losses only and its backward recomputes the chunks with those row weights.

Three implementations with one signature:
  fused_linear_cross_entropy    kernels/head.py: Triton kernels per chunk (CUDA, or CPU with TRITON_INTERPRET=1)
  chunked_linear_cross_entropy  here: the same chunking in plain PyTorch (the CPU / MPS path)
  eager_linear_cross_entropy    here: materialises the logits (plain reference for tests)
The chunk loop, the custom op and its autograd live here, written once for both chunked implementations
(`register_op`); this module never imports Triton.
"""

import torch
import torch.nn.functional as F

from kernels import triton_unavailable

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels support

# -----------------------------------------------------------------------------
# One chunk in plain PyTorch (same math as the Triton kernels)


def rows_loss(logits, lse, targets, ignore_index):
    valid = targets != ignore_index
    tgt_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, lse - tgt_logit, 0.0)


def torch_chunk(x, weight, buf, targets, row_scale, logit_mult, softcap, ignore_index):
    """Loss rows of one chunk; if row_scale is given, buf is overwritten with fp32 dloss/dlogits."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(x, weight.t(), out=buf)
    else:
        buf.copy_(x @ weight.t())
    if softcap > 0:
        buf.mul_(logit_mult / softcap).tanh_()  # buf holds tanh(z / softcap) for the grad below
        dcap = torch.square(buf).neg_().add_(1.0) if row_scale is not None else None
        buf.mul_(softcap)
    else:
        buf.mul_(logit_mult)
    lse = torch.logsumexp(buf, dim=1)
    loss = rows_loss(buf, lse, targets, ignore_index)
    if row_scale is not None:
        g = buf.sub_(lse[:, None]).exp_()
        valid = targets != ignore_index
        rows = torch.arange(len(targets), device=x.device)
        g[rows, targets.clamp(min=0)] -= valid.to(g.dtype)
        g.mul_(row_scale[:, None] * logit_mult)
        if softcap > 0:
            g.mul_(dcap)
    return loss


# -----------------------------------------------------------------------------
# Chunk loop shared by both chunked implementations


def default_chunk_size(n, d, V, device_type="cpu"):
    """Rows per chunk: chunk logits about the size of x, but at least 64 MiB of fp32 on CPU and 256 MiB on
    GPU, in multiples of 16 rows. Smaller chunks are slower: the grad_W update becomes a thin, memory-bound
    matmul per chunk (CPU, N=2048 d=512 V=32768: 128-row chunks 1.4-1.7x slower than 512)."""
    floor = 1 << 26 if device_type == "cuda" else 1 << 24
    rows = max(n * d, floor) // max(V, 1)
    return max(16, min(n, rows) // 16 * 16)


def lce_chunks(x, weight, targets, row_scale, logit_mult, softcap, ignore_index, chunk_size, chunk_fn):
    """Loop over token chunks, chunk_fn computing each (torch_chunk, or the Triton one). row_scale None: losses
    only. Else also grad_x, grad_W (fp32 accumulated) for the objective sum_i row_scale[i] * loss[i], computed
    from each chunk's dlogits buffer."""
    n, V = x.shape[0], weight.shape[0]
    rows = chunk_size if chunk_size > 0 else default_chunk_size(n, x.shape[1], V, x.device.type)
    buf = torch.empty(min(rows, n), V, device=x.device, dtype=torch.float32)
    loss = torch.empty(n, device=x.device, dtype=torch.float32)
    grads = row_scale is not None
    grad_x = torch.empty_like(x) if grads else None
    grad_w = torch.zeros(weight.shape, device=x.device, dtype=torch.float32) if grads else None
    fp32 = x.dtype == torch.float32 and weight.dtype == torch.float32
    w_mm = weight if fp32 else weight.to(x.dtype)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        xc, g = x[s:e], buf[: e - s]
        loss[s:e] = chunk_fn(xc, weight, g, targets[s:e], row_scale[s:e] if grads else None,
                             logit_mult, softcap, ignore_index)
        if not grads:
            continue
        if fp32:
            torch.mm(g, weight, out=grad_x[s:e])
            grad_w.addmm_(g.t(), xc)
        else:  # low precision: tensor-core matmuls (fp32 accumulate inside), fp32 sum across chunks
            g = g.to(x.dtype)
            grad_x[s:e] = g @ w_mm
            grad_w += g.t() @ xc
    return loss, grad_x, grad_w


# -----------------------------------------------------------------------------
# Custom op + autograd, one per chunk implementation


def register_op(name, chunk_fn):
    """Define the custom op `nanochat_mup::<name>` (opaque to torch.compile) over lce_chunks with chunk_fn, with
    its backward op `<name>_backward`, fakes and autograd; return it. Its arguments: (x, weight, targets,
    logit_mult, softcap, ignore_index, reduction 'sum' or 'none', chunk_size)."""

    @torch.library.custom_op(f"nanochat_mup::{name}", mutates_args=())
    def op(
        x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, logit_mult: float, softcap: float,
        ignore_index: int, reduction: str, chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """reduction 'sum': (loss, grad_x, fp32 grad_W), grads computed here. 'none': (losses, empty, empty)."""
        with torch.autocast(x.device.type, enabled=False):  # the inputs' dtypes decide (call() applied autocast's)
            if reduction == "none":
                loss, _, _ = lce_chunks(x, weight, targets, None, logit_mult, softcap, ignore_index, chunk_size,
                                        chunk_fn)
                return loss, x.new_empty(0), weight.new_empty(0)
            row_scale = (targets != ignore_index).float()
            loss, grad_x, grad_w = lce_chunks(x, weight, targets, row_scale, logit_mult, softcap, ignore_index,
                                              chunk_size, chunk_fn)
        return loss.sum(), grad_x, grad_w

    @op.register_fake
    def _(x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size):
        f32 = dict(device=x.device, dtype=torch.float32)
        if reduction == "none":
            return x.new_empty(x.shape[0], **f32), x.new_empty(0), weight.new_empty(0)
        return x.new_empty((), **f32), torch.empty_like(x), torch.empty_like(weight, dtype=torch.float32)

    @torch.library.custom_op(f"nanochat_mup::{name}_backward", mutates_args=())
    def backward_op(
        x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_loss: torch.Tensor,
        logit_mult: float, softcap: float, ignore_index: int, chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """reduction='none': recompute the chunks with the per-row output grads as row weights."""
        row_scale = torch.where(targets != ignore_index, grad_loss.float(), 0.0)
        with torch.autocast(x.device.type, enabled=False):
            _, grad_x, grad_w = lce_chunks(x, weight, targets, row_scale, logit_mult, softcap, ignore_index,
                                           chunk_size, chunk_fn)
        return grad_x, grad_w.to(weight.dtype)

    @backward_op.register_fake
    def _(x, weight, targets, grad_loss, logit_mult, softcap, ignore_index, chunk_size):
        return torch.empty_like(x), torch.empty_like(weight)

    def setup_context(ctx, inputs, output):
        x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size = inputs
        ctx.reduction = reduction
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.args = (logit_mult, softcap, ignore_index, chunk_size)
        if reduction == "none":
            ctx.save_for_backward(x, weight, targets)
        else:
            ctx.save_for_backward(output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    def backward(ctx, grad_loss, _grad_x, _grad_w):
        if ctx.reduction == "none":
            x, weight, targets = ctx.saved_tensors
            grad_x, grad_w = backward_op(x, weight, targets, grad_loss, *ctx.args)
        else:  # sum: a scalar rescale (the mean's 1/count arrives inside grad_loss), in fp32 so that the
            # scale is not rounded to bf16 first
            grad_x, grad_w = (g.to(torch.float32, copy=True).mul_(grad_loss).to(dt)
                              for g, dt in zip(ctx.saved_tensors, ctx.dtypes, strict=True))
        return grad_x, grad_w, None, None, None, None, None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    return op


CHUNKED_OP = register_op("chunked_linear_cross_entropy", torch_chunk)


# -----------------------------------------------------------------------------
# Public API


def call(op, x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size):
    """Run a register_op op as the public functions do: checks, autocast's dtype, 'mean' from 'sum'."""
    assert x.ndim == 2 and weight.ndim == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert targets.shape == (x.shape[0],) and targets.dtype == torch.int64, (targets.shape, targets.dtype)
    assert reduction in ("mean", "sum", "none"), reduction
    x = x.to(compute_dtype(x))
    weight = weight.to(x.dtype)  # like autocast: matmuls in x's dtype (the kernel needs one dtype)
    loss = op(x.contiguous(), weight.contiguous(), targets.contiguous(), float(logit_mult), float(softcap),
              ignore_index, "none" if reduction == "none" else "sum", chunk_size)[0]
    if reduction == "mean":
        # dividing outside the op keeps the dlogits unscaled in the chunk (no fp16 underflow at large N)
        # and needs no host sync; all rows ignored gives 0 / 1
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss


def compute_dtype(x):
    """The dtype of the head's matmuls: autocast's, as F.linear would use (a custom op gets no autocast
    casts, so the wrappers cast), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def unsupported(device_type, dtype, auto=False):
    """Why the Triton head cannot run this case (one phrase naming it), or None if it can. Any d and V fit:
    the kernels loop over d and vocab tiles with masks. auto=True: also float32, which `auto` leaves to the chunked
    PyTorch head (cuBLAS TF32) rather than the kernel's three tf32 products per product (tf32x3), kept for
    `triton` and for base_train's timed choice (nanochat/kernel_choice.py)."""
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernels support float32, bfloat16, float16)"
    if auto and dtype == torch.float32:
        return "float32 under auto (it takes the kernel for bfloat16 and float16 only)"
    return triton_unavailable(device_type)


def chunked_linear_cross_entropy(x, weight, targets, *, logit_mult=1.0, softcap=0.0, ignore_index=-1,
                                 reduction="mean", chunk_size=0):
    """Plain PyTorch path with the same chunking (never materialises the (N, V) logits). x (N, d), weight (V, d),
    targets (N,) int64 -> fp32 loss. chunk_size 0: automatic."""
    return call(CHUNKED_OP, x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size)


def eager_linear_cross_entropy(x, weight, targets, *, logit_mult=1.0, softcap=0.0, ignore_index=-1,
                               reduction="mean", chunk_size=0):
    """Reference: materialises the logits in max(fp32, input dtype). chunk_size is ignored."""
    logits = F.linear(x, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_mult
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if reduction != "mean":
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    # F.cross_entropy's mean is NaN when every row is ignored; ours is 0
    count = (targets != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / count
