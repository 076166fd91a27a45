"""
Fused output head in Triton: lm_head matmul + muP logit multiplier + tanh softcap + cross-entropy per token chunk.

    logits = softcap * tanh((x @ W.T * logit_mult) / softcap)    (softcap == 0: no cap)
    loss   = cross_entropy(logits, targets, ignore_index, reduction)

The chunk loop, the custom op and its autograd are kernels/head_torch.py's (Liger-Kernel's fused linear
cross-entropy, Hsu et al. 2024); this file supplies the chunk: one kernel writes a chunk's (capped) logits and
partial log-sum-exps, a second turns them into dloss/dlogits in place. `fused_linear_cross_entropy` has the
signature of head_torch's chunked and eager versions.
"""

import torch
import triton
import triton.language as tl

from kernels import INTERPRET
from kernels.head_torch import call, compute_dtype, register_op, rows_loss, unsupported

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
    if INTERPRET:  # few, large programs: the interpreter pays per op, not per element
        return dict(BLOCK_M=64, BLOCK_V=256, BLOCK_D=min(128, triton.next_power_of_2(d)),
                    TILES_PER_PROG=1 << 20, DOT_PRECISION="ieee"), {}
    # Compiles for sm_90 to wgmma with no register spills, within the H100's shared memory
    # (tests/test_kernel_configs.py). fp32 inputs: tf32x3 (three tf32 products, about fp32 accuracy, on tensor
    # cores; "ieee" is an FMA loop that spills) on a narrower k step, as tf32x3 keeps two parts of each operand.
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=32 if fp32 else 64, TILES_PER_PROG=8,
                DOT_PRECISION="tf32x3" if fp32 else "tf32"), dict(num_warps=8, num_stages=3)


def triton_chunk(x, weight, buf, targets, row_scale, logit_mult, softcap, ignore_index):
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
        logit_mult, softcap, UPCAST=INTERPRET, **cfg, **launch)  # the interpreter's 16-bit tl.dot is wrong
    lse = torch.logsumexp(lse_parts, dim=1)
    loss = rows_loss(buf, lse, targets, ignore_index)
    if row_scale is not None:
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))
        # 8 warps: a 128 x 128 fp32 tile on 4 warps needs 255 registers and spills
        _dlogits_kernel[grid](buf, lse, targets, row_scale, n, V, buf.stride(0), logit_mult, softcap,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], num_warps=8)
    return loss


FUSED_OP = register_op("fused_linear_cross_entropy", triton_chunk)


def fused_linear_cross_entropy(x, weight, targets, *, logit_mult=1.0, softcap=0.0, ignore_index=-1,
                               reduction="mean", chunk_size=0):
    """Triton path. x (N, d), weight (V, d), targets (N,) int64 -> fp32 loss. chunk_size 0: automatic."""
    if why := unsupported(x.device.type, compute_dtype(x)):
        raise ValueError(f"the Triton head cannot run {why}: use chunked_linear_cross_entropy (head_impl='chunked')")
    return call(FUSED_OP, x, weight, targets, logit_mult, softcap, ignore_index, reduction, chunk_size)
