import inspect
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from conftest import DEVICE, rel_err

import kernels
import kernels.attention as attention
from kernels.attention import flash_attention, flash_attn_fwd
from kernels.attention_torch import HEAD_DIMS, attention_reference, sliding_window_mask, unsupported

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (B, T, H, H_kv, D, causal, window, scale): odd T, GQA 2:1 / 4:1 / MQA, windows below, at and above
# the 64-wide tile and above T, window 0, non-causal, head_dim 32 and 64, muP (1/d) and SP (1/sqrt d)
CASES = [
    (1, 1, 2, 1, 32, True, None, "sp"),
    (1, 1, 2, 2, 32, True, 0, "mup"),
    (2, 77, 4, 2, 32, True, None, "sp"),
    (1, 77, 4, 1, 64, True, 10, "mup"),
    (1, 130, 4, 1, 32, True, 200, "sp"),
    (1, 130, 2, 2, 64, True, 0, "sp"),
    (1, 130, 4, 2, 64, True, 70, "mup"),
    (1, 192, 2, 1, 32, True, 64, "sp"),
    (2, 128, 2, 2, 64, True, None, "mup"),
    (1, 130, 2, 1, 32, False, None, "mup"),
    (2, 77, 2, 2, 64, False, None, "sp"),
]
LONG_CASES = [(1, 8192, 4, 2, 128, True, None, "sp"), (1, 8192, 4, 1, 128, True, 2048, "mup"),
              (2, 4097, 4, 4, 64, True, 1000, "sp")]


def _scale(kind, D):
    return 1.0 / D if kind == "mup" else 1.0 / math.sqrt(D)


def _inputs(B, T, H, H_kv, D, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return make(B, T, H, D), make(B, T, H_kv, D), make(B, T, H_kv, D), make(B, T, H, D)


def _run(fn, q, k, v, do, **kw):
    """Output and input grads of fn, computed in the inputs' dtype."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("B,T,H,H_kv,D,causal,window,scale", CASES)
def test_fp32_matches_fp64_reference(B, T, H, H_kv, D, causal, window, scale):
    q, k, v, do = _inputs(B, T, H, H_kv, D, torch.float32)
    kw = dict(scale=_scale(scale, D), causal=causal, window=window)
    out = _run(flash_attention, q, k, v, do, **kw)
    ref = _run(attention_reference, q.double(), k.double(), v.double(), do.double(), **kw)
    for name, x, r in zip("o dq dk dv".split(), out, ref, strict=True):
        assert x.dtype == torch.float32 and x.shape == r.shape
        assert rel_err(x, r) < 1e-5, f"{name}: {rel_err(x, r):.2e}"


# every listed launch config's tile, once per kernel: (kernel, BLOCK_M, BLOCK_N) -> the first (bytes per element,
# head_dim, num_warps, num_stages) listing it. The test runs each exactly as listed (so on CUDA the autotuner's prune
# keeps it, and it is one of the configs the sm_90 compile check covers) in its dtype; the other two kernels keep
# their own configs.
KERNELS = {"fwd": (attention._attn_fwd, attention._FWD_CONFIGS),
           "dkdv": (attention._attn_bwd_dkdv, attention._DKDV_CONFIGS),
           "dq": (attention._attn_bwd_dq, attention._DQ_CONFIGS)}
TILES = {}
for _name, (_, _table) in KERNELS.items():
    for (_size, _d), _configs in sorted(_table.items()):
        for _m, _n, _w, _s in _configs:
            TILES.setdefault((_name, _m, _n), (_size, _d, _w, _s))


@pytest.mark.parametrize("kernel,block_m,block_n", sorted(TILES))
def test_gpu_tile_shapes(kernel, block_m, block_n, monkeypatch):
    # the interpreter otherwise only runs 64x64; the tile-range logic must hold for the CUDA shapes too
    size, D, warps, stages = TILES[kernel, block_m, block_n]
    tuner = KERNELS[kernel][0]
    monkeypatch.setattr(tuner, "configs", [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                                                         num_stages=stages)])
    monkeypatch.setattr(tuner, "cache", {})  # a tuning cached by an earlier test would bypass the config
    for window in (None, 45, 150):
        if size == 4:  # fp32: against fp64, as test_fp32_matches_fp64_reference
            q, k, v, do = _inputs(1, 170, 2, 1, D, torch.float32)  # T: a ragged last tile for every tile size
            kw = dict(scale=_scale("sp", D), window=window)
            out = _run(flash_attention, q, k, v, do, **kw)
            ref = _run(attention_reference, q.double(), k.double(), v.double(), do.double(), **kw)
            for name, x, r in zip("o dq dk dv".split(), out, ref, strict=True):
                assert rel_err(x, r) < 1e-5, f"{name} window={window}: {rel_err(x, r):.2e}"
        else:  # bf16 tiles: flash-attn's rule, as test_gpu_low_precision
            _check_low_precision(1, 170, 2, 1, D, True, window, "sp", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_interpreter_smoke(dtype):
    # the interpreter upcasts 16-bit tiles, so this checks the load/store/cast plumbing only
    _check_low_precision(1, 77, 4, 2, 64, True, 20, "sp", dtype)


def test_lse_and_no_nan_when_row_tiles_fully_masked():
    # window 5 < tile 64: late rows of a query tile see nothing in the tile's first key block
    q, k, v, _ = _inputs(1, 130, 2, 1, 32, torch.float32)
    q = q * 30  # peaked softmax: large scores must not overflow either
    scale = 1 / math.sqrt(32)
    o, lse = flash_attn_fwd(q, k, v, scale, True, 5)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    ref = attention_reference(q.double(), k.double(), v.double(), scale=scale, window=5)
    assert rel_err(o, ref) < 1e-5
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double().expand(-1, -1, 2, -1)) * scale
    scores = scores.masked_fill(~sliding_window_mask(130, 5, q.device), float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1) / math.log(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 0, 3, 300])
def test_sdpa_mask_matches_reference(window):
    q, k, v, _ = _inputs(2, 40, 4, 2, 32, torch.float64)
    mask = sliding_window_mask(40, window, q.device)
    assert mask.shape == (40, 40) and mask.dtype == torch.bool
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=0.1, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, attention_reference(q, k, v, scale=0.1, window=window))


def test_scale_is_a_runtime_argument():
    # a constexpr scale would compile one kernel per value (muP and SP use different ones)
    params = inspect.signature(attention._attn_fwd.fn.fn).parameters
    assert params["qk_scale"].annotation is not tl.constexpr
    q, k, v, _ = _inputs(1, 64, 2, 1, 32, torch.float32)
    n_kernels = lambda: sum(len(c[0]) for c in getattr(attention._attn_fwd.fn, "device_caches", {}).values())
    flash_attention(q, k, v, scale=0.1)
    before = n_kernels()
    o = flash_attention(q, k, v, scale=0.2)
    assert n_kernels() == before
    assert rel_err(o, attention_reference(q.double(), k.double(), v.double(), scale=0.2)) < 1e-5


def test_torch_compile_fullgraph():
    q, k, v, do = _inputs(1, 70, 2, 1, 32, torch.float32)
    f = lambda q, k, v: flash_attention(q, k, v, scale=0.125, window=16)
    compiled = torch.compile(f, fullgraph=True)
    for x, r in zip(_run(compiled, q, k, v, do), _run(f, q, k, v, do), strict=True):
        torch.testing.assert_close(x, r)


def test_rejects_bad_shapes():
    q, k, v, _ = _inputs(1, 8, 2, 1, 48, torch.float32)
    with pytest.raises(ValueError, match=r"head_dim=48 \(the kernels support 32, 64, 128\): use SDPA"):
        flash_attention(q, k, v, scale=0.1)
    q, k, v, _ = _inputs(1, 8, 3, 2, 32, torch.float32)
    with pytest.raises(AssertionError, match="divide"):
        flash_attention(q, k, v, scale=0.1)
    q, k, v, _ = _inputs(1, 8, 2, 1, 32, torch.float32)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attention(q, k, v.bfloat16(), scale=0.1)


def test_unsupported_cases_are_named(monkeypatch):
    for D in HEAD_DIMS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert unsupported(DEVICE, dtype, D) is None
    assert "head_dim=80" in unsupported("cuda", torch.bfloat16, 80)
    assert "dtype torch.float64" in unsupported("cuda", torch.float64, 64)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert "pip install triton" in unsupported("cuda", torch.float32, 64)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    assert "device cpu" in unsupported("cpu", torch.float32, 64)


def test_autocast_casts_like_sdpa():
    # what the model hands over under bf16 autocast when rotary/norm run in fp32: fp32 q, k next to a bf16 v.
    # A custom op gets no autocast casts, so the wrapper casts all three to bf16, as autocast does for SDPA.
    q, k, v, do = _inputs(1, 77, 4, 2, 64, torch.float32)
    kw = dict(scale=0.125, window=20)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = _run(flash_attention, q, k, v.bfloat16(), do.bfloat16(), **kw)
    ref = _run(flash_attention, q.bfloat16(), k.bfloat16(), v.bfloat16(), do.bfloat16(), **kw)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == out[2].dtype == torch.float32
    for name, x, r in zip("o dq dk dv".split(), out, ref, strict=True):
        assert torch.equal(x, r.to(x.dtype)), name


# -----------------------------------------------------------------------------
# GPU tier: flash-attn's rule, the kernel's error against an fp32 reference must stay within 2x
# of PyTorch's own error when it computes the same attention in the low dtype.


def _check_low_precision(B, T, H, H_kv, D, causal, window, scale, dtype):
    q, k, v, do = _inputs(B, T, H, H_kv, D, dtype)
    kw = dict(scale=_scale(scale, D), causal=causal, window=window)
    out = _run(flash_attention, q, k, v, do, **kw)
    ref = _run(attention_reference, q.float(), k.float(), v.float(), do.float(), **kw)
    low = _run(attention_reference, q, k, v, do, **kw)
    for name, x, r, lo in zip("o dq dk dv".split(), out, ref, low, strict=True):
        assert x.dtype == dtype
        err, torch_err = (x.float() - r).abs().max().item(), (lo.float() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-5, f"{name}: kernel {err:.2e} vs torch {torch_err:.2e}"


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,H_kv,D,causal,window,scale", CASES + LONG_CASES)
def test_gpu_low_precision(B, T, H, H_kv, D, causal, window, scale, dtype):
    _check_low_precision(B, T, H, H_kv, D, causal, window, scale, dtype)
