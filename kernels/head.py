"""
Fused output head: lm_head matmul + muP logit multiplier + tanh softcap + cross-entropy.

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
  fused_linear_cross_entropy    Triton kernels per chunk (CUDA, or CPU with TRITON_INTERPRET=1)
  chunked_linear_cross_entropy  same chunking in plain PyTorch (CPU path and reference)
  eager_linear_cross_entropy    materialises the logits (plain reference for tests)
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The interpreter's bf16/fp16 tl.dot is wrong; upcast dot operands there (read once, at import,
# because TRITON_INTERPRET is consumed when the @triton.jit functions below are created).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -----------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tanh(y):
    # exp2 of a non-positive argument never overflows, so this is safe for any |y|
    e = tl.exp2(tl.abs(y) * -2.8853900817779268)  # exp(-2|y|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0.0, -t, t)


@triton.jit
def _logits_lse_kernel(
    x_ptr, w_ptr, buf_ptr, lse_ptr,
    n_rows, V, D, stride_x, stride_w, stride_buf, n_splits,
    logit_mult, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES_PER_PROG: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M rows x a slice of TILES_PER_PROG vocab tiles. Writes the (capped)
    # logits into the chunk buffer and the slice's partial log-sum-exp, combined on the host.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    v_start = pid_s * BLOCK_V * TILES_PER_PROG
    v_end = tl.minimum(V, v_start + BLOCK_V * TILES_PER_PROG)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_mask = ks < D
            a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            # int64 offsets: V * d (and chunk * V) can pass 2^31
            b = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None],
                        mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        z = acc * logit_mult
        if softcap > 0:
            z = _tanh(z / softcap) * softcap
        tl.store(buf_ptr + rows[:, None].to(tl.int64) * stride_buf + cols[None, :], z,
                 mask=row_mask[:, None] & col_mask[None, :])
        # the first tile of a slice always has a valid column, so m_new is finite from then on
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        p = tl.exp2((z - m_new[:, None]) * 1.4426950408889634)
        s_i = s_i * tl.exp2((m_i - m_new) * 1.4426950408889634) + tl.sum(p, axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows * n_splits + pid_s, m_i + tl.log(s_i), mask=row_mask)


@triton.jit
def _dlogits_kernel(
    buf_ptr, lse_ptr, tgt_ptr, scale_ptr,
    n_rows, V, stride_buf, logit_mult, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # dloss/dz = (softmax - onehot) * (1 - tanh^2) * logit_mult * row_scale, in place over the
    # capped logits c (tanh = c / softcap, so the pre-cap value is not needed)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < V)
    ptrs = buf_ptr + rows[:, None].to(tl.int64) * stride_buf + cols[None, :]
    c = tl.load(ptrs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    g = tl.exp2((c - lse[:, None]) * 1.4426950408889634)
    g = tl.where(cols[None, :] == tgt[:, None], g - 1.0, g)
    g = g * (scale * logit_mult)[:, None]
    if softcap > 0:
        t = c / softcap
        g = g * (1.0 - t * t)
    tl.store(ptrs, g, mask=mask)


def _triton_cfg(d, dtype):
    if _INTERPRET:  # few, large programs: the interpreter pays per op, not per element
        return dict(BLOCK_M=64, BLOCK_V=256, BLOCK_D=min(128, triton.next_power_of_2(d)),
                    TILES_PER_PROG=1 << 20, DOT_PRECISION="ieee"), {}
    # Compiles for sm_90 to wgmma with no register spills, within the H100's shared memory
    # (tests/test_kernel_configs.py). fp32 inputs: tf32x3 (three tf32 products, about fp32 accuracy, on tensor
    # cores; "ieee" is an FMA loop that spills) on a narrower k step, as tf32x3 keeps two parts of each operand.
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=32 if fp32 else 64, TILES_PER_PROG=8,
                DOT_PRECISION="tf32x3" if fp32 else "tf32"), dict(num_warps=8, num_stages=3)


def _triton_chunk(x, weight, buf, targets, row_scale, logit_mult, softcap, ignore_index):
    """Loss rows of one chunk; if row_scale is given, buf is overwritten with fp32 dloss/dlogits."""
    n, d = x.shape
    V = weight.shape[0]
    cfg, launch = _triton_cfg(d, x.dtype)
    vocab_per_prog = cfg["BLOCK_V"] * cfg["TILES_PER_PROG"]
    n_splits = triton.cdiv(V, vocab_per_prog)
    lse_parts = torch.empty(n, n_splits, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), n_splits)
    _logits_lse_kernel[grid](
        x, weight, buf, lse_parts, n, V, d, x.stride(0), weight.stride(0), buf.stride(0), n_splits,
        logit_mult, softcap, UPCAST=_INTERPRET, **cfg, **launch)
    lse = torch.logsumexp(lse_parts, dim=1)
    loss = _rows_loss(buf, lse, targets, ignore_index)
    if row_scale is not None:
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))
        # 8 warps: a 128 x 128 fp32 tile on 4 warps needs 255 registers and spills
        _dlogits_kernel[grid](buf, lse, targets, row_scale, n, V, buf.stride(0), logit_mult, softcap,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], num_warps=8)
    return loss


# -----------------------------------------------------------------------------
# Plain PyTorch chunk (same math as the kernels)


def _torch_chunk(x, weight, buf, targets, row_scale, logit_mult, softcap, ignore_index):
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
    loss = _rows_loss(buf, lse, targets, ignore_index)
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
# Chunk loop shared by both implementations


def _rows_loss(logits, lse, targets, ignore_index):
    valid = targets != ignore_index
    tgt_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, lse - tgt_logit, 0.0)


def default_chunk_size(n, d, V, device_type="cpu"):
    """Rows per chunk: chunk logits about the size of x, but at least 64 MiB of fp32 on CPU and 256 MiB on
    GPU, in multiples of 16 rows. Smaller chunks are slower: the grad_W update becomes a thin, memory-bound
    matmul per chunk (CPU, N=2048 d=512 V=32768: 128-row chunks 1.4-1.7x slower than 512)."""
    floor = 1 << 26 if device_type == "cuda" else 1 << 24
    rows = max(n * d, floor) // max(V, 1)
    return max(16, min(n, rows) // 16 * 16)


def _lce_chunks(x, weight, targets, row_scale, logit_mult, softcap, ignore_index, chunk_size, use_triton):
    """Loop over token chunks. row_scale None: losses only. Else also grad_x, grad_W (fp32 accumulated)
    for the objective sum_i row_scale[i] * loss[i], computed from each chunk's dlogits buffer."""
    chunk_fn = _triton_chunk if use_triton else _torch_chunk
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
# Custom op + autograd


@torch.library.custom_op("nanochat_mup::linear_cross_entropy", mutates_args=())
def _lce_op(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, logit_mult: float, softcap: float,
    ignore_index: int, reduction: str, chunk_size: int, use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction 'sum': (loss, grad_x, fp32 grad_W), grads computed here. 'none': (losses, empty, empty)."""
    with torch.autocast(x.device.type, enabled=False):  # the inputs' dtypes decide (_lce applied autocast's)
        if reduction == "none":
            loss, _, _ = _lce_chunks(x, weight, targets, None, logit_mult, softcap, ignore_index, chunk_size,
                                     use_triton)
            return loss, x.new_empty(0), weight.new_empty(0)
        row_scale = (targets != ignore_index).float()
        loss, grad_x, grad_w = _lce_chunks(x, weight, targets, row_scale, logit_mult, softcap, ignore_index,
                                           chunk_size, use_triton)
    return loss.sum(), grad_x, grad_w


@_lce_op.register_fake
def _(x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size, use_triton):
    f32 = dict(device=x.device, dtype=torch.float32)
    if reduction == "none":
        return x.new_empty(x.shape[0], **f32), x.new_empty(0), weight.new_empty(0)
    return x.new_empty((), **f32), torch.empty_like(x), torch.empty_like(weight, dtype=torch.float32)


@torch.library.custom_op("nanochat_mup::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_loss: torch.Tensor,
    logit_mult: float, softcap: float, ignore_index: int, chunk_size: int, use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction='none': recompute the chunks with the per-row output grads as row weights."""
    row_scale = torch.where(targets != ignore_index, grad_loss.float(), 0.0)
    with torch.autocast(x.device.type, enabled=False):
        _, grad_x, grad_w = _lce_chunks(x, weight, targets, row_scale, logit_mult, softcap, ignore_index,
                                        chunk_size, use_triton)
    return grad_x, grad_w.to(weight.dtype)


@_lce_backward_op.register_fake
def _(x, weight, targets, grad_loss, logit_mult, softcap, ignore_index, chunk_size, use_triton):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size, use_triton = inputs
    ctx.reduction = reduction
    ctx.dtypes = (x.dtype, weight.dtype)
    ctx.args = (logit_mult, softcap, ignore_index, chunk_size, use_triton)
    if reduction == "none":
        ctx.save_for_backward(x, weight, targets)
    else:
        ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad_x, _grad_w):
    if ctx.reduction == "none":
        x, weight, targets = ctx.saved_tensors
        grad_x, grad_w = _lce_backward_op(x, weight, targets, grad_loss, *ctx.args)
    else:  # sum: a scalar rescale (the mean's 1/count arrives inside grad_loss), in fp32 so that the
        # scale is not rounded to bf16 first
        grad_x, grad_w = (g.to(torch.float32, copy=True).mul_(grad_loss).to(dt)
                          for g, dt in zip(ctx.saved_tensors, ctx.dtypes, strict=True))
    return grad_x, grad_w, None, None, None, None, None, None, None


torch.library.register_autograd(_lce_op, _backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# Public API


def _lce(x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size, use_triton):
    assert x.ndim == 2 and weight.ndim == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert targets.shape == (x.shape[0],) and targets.dtype == torch.int64, (targets.shape, targets.dtype)
    assert reduction in ("mean", "sum", "none"), reduction
    x = x.to(compute_dtype(x))
    weight = weight.to(x.dtype)  # like autocast: matmuls in x's dtype (the kernel needs one dtype)
    loss = _lce_op(x.contiguous(), weight.contiguous(), targets.contiguous(), float(logit_mult),
                   float(softcap), ignore_index, "none" if reduction == "none" else "sum", chunk_size,
                   use_triton)[0]
    if reduction == "mean":
        # dividing outside the op keeps the dlogits unscaled in the chunk (no fp16 underflow at large N)
        # and needs no host sync; all rows ignored gives 0 / 1
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss


def compute_dtype(x):
    """The dtype of the head's matmuls: autocast's, as F.linear would use (a custom op gets no autocast
    casts, so the wrappers cast), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def unsupported(device_type, dtype):
    """Why the Triton head cannot run this case (one phrase naming it), or None if it can. Any d and V fit:
    the kernels loop over d and vocab tiles with masks."""
    if device_type != "cuda" and not _INTERPRET:
        return f"device {device_type} (the kernels need CUDA, or TRITON_INTERPRET=1 set before import)"
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernels support float32, bfloat16, float16)"
    return None


def fused_linear_cross_entropy(x, weight, targets, *, logit_mult=1.0, softcap=0.0, ignore_index=-1,
                               reduction="mean", chunk_size=0):
    """Triton path. x (N, d), weight (V, d), targets (N,) int64 -> fp32 loss. chunk_size 0: automatic."""
    if why := unsupported(x.device.type, compute_dtype(x)):
        raise ValueError(f"the Triton head cannot run {why}: use chunked_linear_cross_entropy (head_impl='chunked')")
    return _lce(x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size, True)


def chunked_linear_cross_entropy(x, weight, targets, *, logit_mult=1.0, softcap=0.0, ignore_index=-1,
                                 reduction="mean", chunk_size=0):
    """Plain PyTorch path with the same chunking (never materialises the (N, V) logits)."""
    return _lce(x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size, False)


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
