"""
Fused causal / sliding-window attention with GQA in Triton, forward and backward.

Algorithm: FlashAttention-2 (Tri Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning"): online softmax over key tiles in the forward, log-sum-exp
saved for the backward, which recomputes the probabilities; dK/dV per key tile looping over
query tiles, dQ per query tile looping over key tiles.

Layout is the model's (B, T, H, D). K/V have H_kv heads with H_kv | H; query head h reads kv
head h // (H / H_kv), so K/V are never repeated in memory. `window` is the number of past
positions a query sees besides itself: query i attends keys j with i - window <= j <= i.
`attention_reference` in kernels/attention_torch.py (pure PyTorch) defines the semantics.
"""

import math

import torch
import triton
import triton.language as tl

from kernels import INTERPRET
from kernels.attention_torch import DTYPES, HEAD_DIMS, check_args, compute_dtype, unsupported

LOG2E = math.log2(math.e)
NO_WINDOW = 1 << 30  # "unlimited": larger than any T, small enough that start + window fits in int32

# -----------------------------------------------------------------------------
# Triton kernels
# Scores live in the log2 domain (qk_scale = scale * log2 e) so the softmax uses exp2; the saved
# lse is log2-based too. Masked scores are -inf but the running max starts finite, so a tile
# with every entry masked gives p = 0 instead of exp2(-inf - -inf) = NaN.


@triton.jit
def _key_range(start_m, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    # Key tiles for query rows [start_m, start_m + BLOCK_M): visible ones span [lo, hi); those in
    # [full_lo, full_hi) need no mask. Tiles entirely outside the window are never visited.
    if CAUSAL:
        lo = tl.maximum(start_m - window, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, T)
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 - window, 0), BLOCK_N) * BLOCK_N
        full_hi = (start_m + 1) // BLOCK_N * BLOCK_N
    else:
        lo = 0
        hi = T
        full_lo = 0
        full_hi = T
    full_hi = tl.minimum(full_hi, T // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(start_n, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    # Mirror of _key_range: query tiles that see key rows [start_n, start_n + BLOCK_N).
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        hi = tl.minimum(start_n + BLOCK_N + window, T)
        full_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
        full_hi = (start_n + window + 1) // BLOCK_M * BLOCK_M
    else:
        lo = 0
        hi = T
        full_lo = 0
        full_hi = T
    full_hi = tl.minimum(full_hi, T // BLOCK_M * BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(i, j, T, window, CAUSAL: tl.constexpr):
    # i (query) and j (key) positions come pre-broadcast, so the backward gets its transposed
    # mask without a layout-changing tl.trans
    keep = (i < T) & (j < T)
    if CAUSAL:
        keep = keep & (j <= i) & (j >= i - window)
    return keep


@triton.jit
def _load_rows(ptr, offs, offs_d, stride, T, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    ptrs = ptr + offs[:, None] * stride + offs_d[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=offs[:, None] < T, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong; fp32 operands are exact
        x = x.to(tl.float32)
    return x


@triton.jit
def _cast_out(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST and dtype == tl.bfloat16:
        # the interpreter truncates fp32 -> bf16; round to nearest even by hand, as the GPU does
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, offs_m, offs_d, start, end, T, window, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, offs_d, stride_kt, T, MASKED, UPCAST)
        v = _load_rows(V, offs_n, offs_d, stride_kt, T, MASKED, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], T, window, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale, T, T_BUCKET, H, group, window,
              stride_qb, stride_qt, stride_kb, stride_kt,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    Q += b * stride_qb + h * HEAD_DIM
    O += b * stride_qb + h * HEAD_DIM
    K += b * stride_kb + (h // group) * HEAD_DIM
    V += b * stride_kb + (h // group) * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, offs_m, offs_d, stride_qt, T, True, UPCAST)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, T, window, BLOCK_M, BLOCK_N, CAUSAL)
    # window edge, then the unmasked bulk, then the diagonal / sequence tail
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, offs_m, offs_d, lo, full_lo, T, window,
                               qk_scale, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, offs_m, offs_d, full_lo, full_hi, T, window,
                               qk_scale, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, offs_m, offs_d, full_hi, hi, T, window,
                               qk_scale, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past T only; keeps them finite
    row_ok = offs_m < T
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    o = acc / l_i[:, None]
    o_ptrs = O + offs_m[:, None] * stride_qt + offs_d[None, :]
    tl.store(o_ptrs, _cast_out(o, O.dtype.element_ty, UPCAST), mask=row_ok[:, None])


@triton.jit
def _bwd_delta(O, DO, DELTA, T, H, stride_qb, stride_qt, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = rowsum(o_i * do_i) = sum_j p_ij dp_ij, the softmax-backward correction term
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off = (bh // H).to(tl.int64) * stride_qb + (bh % H) * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(O + off, offs_m, offs_d, stride_qt, T, True, True)
    do = _load_rows(DO + off, offs_m, offs_d, stride_qt, T, True, True)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_kv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, offs_n, offs_d, start, end, T, window,
                  qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Works on transposed tiles (keys x queries) so dk/dv accumulate as [BLOCK_N, D].
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, offs_m, offs_d, stride_qt, T, MASKED, UPCAST)
        do = _load_rows(DO, offs_m, offs_d, stride_qt, T, MASKED, UPCAST)
        if MASKED:
            lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(_visible(offs_m[None, :], offs_n[:, None], T, window, CAUSAL), pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, scale, qk_scale, T, T_BUCKET, H, group, window,
                   stride_qb, stride_qt, stride_kb, stride_kt,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (key tile, kv head); it sums over the `group` query heads sharing that kv
    # head, so GQA needs neither a repeated K/V nor atomics.
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    H_kv = H // group
    b = bkv // H_kv
    kv_off = b.to(tl.int64) * stride_kb + (bkv % H_kv) * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K + kv_off, offs_n, offs_d, stride_kt, T, True, UPCAST)
    v = _load_rows(V + kv_off, offs_n, offs_d, stride_kt, T, True, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_range(start_n, T, window, BLOCK_M, BLOCK_N, CAUSAL)
    for g in range(group):
        h = (bkv % H_kv) * group + g
        q_off = b.to(tl.int64) * stride_qb + h * HEAD_DIM
        row_off = (b * H + h) * T
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, Q + q_off, DO + q_off, LSE + row_off, DELTA + row_off, stride_qt,
                               offs_n, offs_d, lo, full_lo, T, window, qk_scale,
                               BLOCK_M, True, CAUSAL, UPCAST, PRECISION)
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, Q + q_off, DO + q_off, LSE + row_off, DELTA + row_off, stride_qt,
                               offs_n, offs_d, full_lo, full_hi, T, window, qk_scale,
                               BLOCK_M, False, CAUSAL, UPCAST, PRECISION)
        dk, dv = _bwd_kv_tiles(dk, dv, k, v, Q + q_off, DO + q_off, LSE + row_off, DELTA + row_off, stride_qt,
                               offs_n, offs_d, full_hi, hi, T, window, qk_scale,
                               BLOCK_M, True, CAUSAL, UPCAST, PRECISION)
    ptrs = offs_n[:, None] * stride_kt + offs_d[None, :]
    row_ok = offs_n[:, None] < T
    tl.store(DK + kv_off + ptrs, _cast_out(dk * scale, DK.dtype.element_ty, UPCAST), mask=row_ok)
    tl.store(DV + kv_off + ptrs, _cast_out(dv, DV.dtype.element_ty, UPCAST), mask=row_ok)


@triton.jit
def _bwd_q_tiles(dq, q, do, lse, delta, K, V, stride_kt, offs_m, offs_d, start, end, T, window, qk_scale,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, offs_d, stride_kt, T, MASKED, UPCAST)
        v = _load_rows(V, offs_n, offs_d, stride_kt, T, MASKED, UPCAST)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], T, window, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, scale, qk_scale, T, T_BUCKET, H, group, window,
                 stride_qb, stride_qt, stride_kb, stride_kt,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q_off = b * stride_qb + h * HEAD_DIM
    K += b * stride_kb + (h // group) * HEAD_DIM
    V += b * stride_kb + (h // group) * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + q_off, offs_m, offs_d, stride_qt, T, True, UPCAST)
    do = _load_rows(DO + q_off, offs_m, offs_d, stride_qt, T, True, UPCAST)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(start_m, T, window, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_q_tiles(dq, q, do, lse, delta, K, V, stride_kt, offs_m, offs_d, lo, full_lo, T, window,
                      qk_scale, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    dq = _bwd_q_tiles(dq, q, do, lse, delta, K, V, stride_kt, offs_m, offs_d, full_lo, full_hi, T, window,
                      qk_scale, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    dq = _bwd_q_tiles(dq, q, do, lse, delta, K, V, stride_kt, offs_m, offs_d, full_hi, hi, T, window,
                      qk_scale, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    ptrs = DQ + q_off + offs_m[:, None] * stride_qt + offs_d[None, :]
    tl.store(ptrs, _cast_out(dq * scale, DQ.dtype.element_ty, UPCAST), mask=offs_m[:, None] < T)


# -----------------------------------------------------------------------------
# Launch configs. Under the interpreter: one big tile (programs run one after another there). On CUDA:
# autotuned, trying only the configs listed for the inputs' element size and head_dim. Each listed config
# compiles for sm_90 with no register spills and within the H100's 232,448 bytes of shared memory per block
# (tests/test_kernel_configs.py). fp32 needs small tiles: tf32x3 keeps a high and a low tf32 part of every
# operand live, and fp32 tiles take twice the shared memory. In the backward, BLOCK_N is the key tile and
# BLOCK_M the query tile.

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (bytes per element, head_dim)
_FWD_CONFIGS = {
    **dict.fromkeys([(2, 32), (2, 64), (2, 128)],
                    [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 2)]),
    **dict.fromkeys([(4, 32), (4, 64)], [(64, 32, 4, 2), (32, 32, 4, 2)]),
    (4, 128): [(16, 32, 4, 2), (16, 16, 4, 2)],
}
_DKDV_CONFIGS = {
    **dict.fromkeys([(2, 32), (2, 64)], [(32, 128, 8, 3), (64, 64, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2)]),
    (2, 128): [(16, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 2)],
    **dict.fromkeys([(4, 32), (4, 64)], [(32, 16, 4, 2), (16, 16, 4, 2)]),
    (4, 128): [(32, 16, 8, 2), (16, 16, 8, 2)],
}
_DQ_CONFIGS = {
    **dict.fromkeys([(2, 32), (2, 64), (2, 128)], [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2)]),
    **dict.fromkeys([(4, 32), (4, 64)], [(64, 32, 4, 2), (32, 16, 4, 2)]),
    (4, 128): [(16, 32, 4, 2), (16, 16, 4, 2)],
}
# Autotune key (Triton adds the tensor arguments' dtypes). T_BUCKET, a kernel argument only for this key,
# instead of T: generation grows T by one per token, and an exact-T key would re-tune at every step.
_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "group"]


def _t_bucket(T):
    """Autotune bucket of a sequence length: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(T))


def _config(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _listed(table, dtype, head_dim):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) configs of `table` for one dtype and head_dim."""
    size = dtype.itemsize
    if (size, head_dim) not in table:
        raise ValueError(f"the Triton attention kernel has no config for {dtype} at head_dim {head_dim}: "
                         "use bfloat16, float16 or float32 with head_dim 32, 64 or 128, or attn_impl='sdpa'")
    return table[size, head_dim]


def _autotune(kernel, table):
    if INTERPRET:
        return triton.autotune([_config(64, 64, 4, 1)], key=_KEY)(kernel)

    def prune(configs, named_args, **kwargs):  # only what fits this dtype and head_dim is ever launched
        listed = _listed(table, named_args["Q"].dtype, kwargs["HEAD_DIM"])
        return [c for c in configs if (*c.kwargs.values(), c.num_warps, c.num_stages) in listed]

    every = [_config(*c) for c in sorted({c for configs in table.values() for c in configs})]
    return triton.autotune(every, key=_KEY, prune_configs_by={"early_config_prune": prune})(kernel)


# every case unsupported() lets through has configs in every table
assert all((dt.itemsize, d) in table for table in (_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS)
           for dt in DTYPES for d in HEAD_DIMS)
_attn_fwd = _autotune(_attn_fwd, _FWD_CONFIGS)
_attn_bwd_dkdv = _autotune(_attn_bwd_dkdv, _DKDV_CONFIGS)
_attn_bwd_dq = _autotune(_attn_bwd_dq, _DQ_CONFIGS)


def _launch_args(q, k, window):
    B, T, H, D = q.shape
    assert D in HEAD_DIMS, f"head_dim must be one of {HEAD_DIMS} for the Triton attention kernel, got {D}"
    # fp32 inputs: 3xTF32 keeps ~fp32 accuracy on tensor cores ("ieee" compiles to spilling FMA loops)
    precision = "tf32x3" if q.dtype == torch.float32 else "tf32"
    return dict(T=T, T_BUCKET=_t_bucket(T), H=H, group=H // k.size(2), window=NO_WINDOW if window is None else window,
                stride_qb=q.stride(0), stride_qt=q.stride(1), stride_kb=k.stride(0), stride_kt=k.stride(1),
                HEAD_DIM=D, UPCAST=INTERPRET, PRECISION=precision)


def _forward(q, k, v, scale, causal, window):
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous(), "strides assume contiguous q, k, v"
    B, T, H, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _attn_fwd[grid](q, k, v, o, lse, scale * LOG2E, CAUSAL=causal, **_launch_args(q, k, window))
    return o, lse


def _backward(do, q, k, v, o, lse, scale, causal, window):
    B, T, H, D = q.shape
    args = _launch_args(q, k, window)
    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(T, 64), B * H)](o, do, delta, T, H, q.stride(0), q.stride(1),
                                            HEAD_DIM=D, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid_kv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * k.size(2))
    _attn_bwd_dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv, scale, scale * LOG2E, CAUSAL=causal, **args)
    grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq, scale, scale * LOG2E, CAUSAL=causal, **args)
    return dq, dk, dv


# -----------------------------------------------------------------------------
# torch.library ops: torch.compile sees one opaque op (fullgraph works, also under the interpreter)


@torch.library.custom_op("nanochat_mup::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                   window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, causal, window)


@flash_attn_fwd.register_fake
def _(q, k, v, scale, causal, window):
    B, T, H, D = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("nanochat_mup::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, scale: float, causal: bool,
                   window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do.contiguous(), q, k, v, o, lse, scale, causal, window)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, scale, causal, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, window = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.causal, ctx.window = scale, causal, window


def _backward_op(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.scale, ctx.causal, ctx.window)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_backward_op, setup_context=_setup_context)


def flash_attention(q, k, v, *, scale, causal=True, window=None):
    """q (B, T, H, D), k and v (B, T, H_kv, D) -> (B, T, H, D). `scale` multiplies q.k (runtime
    value: changing it does not recompile). `window`: past positions visible besides self.
    Under autocast q, k, v are cast to the autocast dtype, as for F.scaled_dot_product_attention."""
    check_args(q, k, v, causal, window)
    dtype = compute_dtype(q, k, v)
    if dtype is None:
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    if why := unsupported(q.device.type, dtype, q.size(3)):
        raise ValueError(f"Triton attention cannot run {why}: use SDPA (attn_impl='sdpa')")
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    return flash_attn_fwd(q, k, v, float(scale), causal, window)[0]
