
import pytest
import torch
from conftest import DEVICE, rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

import kernels
from kernels import head, head_torch
from kernels.head import fused_linear_cross_entropy
from kernels.head_torch import chunked_linear_cross_entropy, eager_linear_cross_entropy

IMPLS = {"triton": fused_linear_cross_entropy, "chunked": chunked_linear_cross_entropy}
CHUNKS = {"triton": head.triton_chunk, "chunked": head_torch.torch_chunk}
N, D, V = 101, 64, 1003  # odd token count, vocab not a power of two


def make_inputs(n=N, d=D, v=V, scale=1.0, ignore_every=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -1
    return x, w, t


def out_grad(reduction, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n if reduction == "none" else (), generator=g, dtype=torch.float64)


def run(fn, x, w, t, grad, dtype, **kw):
    """loss, grad_x, grad_W (on the CPU) of fn on copies of x, w in dtype on DEVICE, backpropagating grad."""
    x = x.detach().to(DEVICE, dtype).requires_grad_()
    w = w.detach().to(DEVICE, dtype).requires_grad_()
    loss = fn(x, w, t.to(DEVICE), **kw)
    loss.backward(grad.to(DEVICE, loss.dtype))
    return loss.detach().cpu(), x.grad.cpu(), w.grad.cpu()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logit_mult", [1.0, 0.25])
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_matches_fp64_reference(impl, reduction, logit_mult, softcap):
    x, w, t = make_inputs(scale=4.0)  # large enough logits that the softcap bends them
    grad = out_grad(reduction, N)
    kw = dict(logit_mult=logit_mult, softcap=softcap, reduction=reduction)
    ref = run(eager_linear_cross_entropy, x, w, t, grad, torch.float64, **kw)
    # chunk of 32 rows: several chunks and a ragged last one
    got = run(IMPLS[impl], x, w, t, grad, torch.float32, chunk_size=32, **kw)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == got[2].dtype == torch.float32
    for name, a, r in zip(("loss", "grad_x", "grad_W"), got, ref, strict=True):
        assert rel_err(a, r) < 1e-5, (name, rel_err(a, r))


@pytest.mark.parametrize("impl", IMPLS)
def test_default_chunk_size_and_huge_logits(impl):
    # |z| ~ 1e3: tanh from exp2 must saturate cleanly, not overflow to NaN
    x, w, t = make_inputs(scale=300.0)
    grad = out_grad("mean", N)
    kw = dict(logit_mult=0.25, softcap=15.0)
    ref = run(eager_linear_cross_entropy, x, w, t, grad, torch.float64, **kw)
    got = run(IMPLS[impl], x, w, t, grad, torch.float32, **kw)
    for a, r in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(impl, reduction):
    x, w, t = make_inputs(n=33)
    t[:] = -1
    loss, gx, gw = run(IMPLS[impl], x, w, t, out_grad(reduction, 33), torch.float32, reduction=reduction,
                       softcap=15.0, chunk_size=16)
    assert (loss == 0).all() and (gx == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_torch_error(impl, dtype):
    # flash-attn rule: our error vs an fp64 reference <= 2x PyTorch's own error in the same dtype, plus
    # 1e-5 for the scalar loss, where both errors are fp32 summation noise of the same size
    x, w, t = make_inputs(scale=4.0)
    grad = out_grad("mean", N)
    kw = dict(logit_mult=0.25, softcap=15.0)
    ref = run(eager_linear_cross_entropy, x, w, t, grad, torch.float64, **kw)
    base = run(eager_linear_cross_entropy, x, w, t, grad, dtype, **kw)
    got = run(IMPLS[impl], x, w, t, grad, dtype, chunk_size=32, **kw)
    assert got[1].dtype == got[2].dtype == dtype
    for name, a, b, r in zip(("loss", "grad_x", "grad_W"), got, base, ref, strict=True):
        assert rel_err(a, r) <= 2 * rel_err(b, r) + 1e-5, (name, rel_err(a, r), rel_err(b, r))


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_like_autocast(impl):
    # bf16 activations with an fp32 weight: matmuls in bf16, each grad in its input's dtype
    x, w, t = make_inputs()
    x = x.to(DEVICE, torch.bfloat16).requires_grad_()
    w = w.to(DEVICE, torch.float32).requires_grad_()
    IMPLS[impl](x, w, t.to(DEVICE), chunk_size=32).backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = run(eager_linear_cross_entropy, x, w, t, torch.tensor(1.0), torch.float64)
    assert rel_err(w.grad.cpu(), ref[2]) < 2e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_casts_like_f_linear(impl):
    # a custom op gets no autocast casts: under bf16 autocast the wrapper must run fp32 x in bf16, as F.linear
    # does, and hand back grads in the inputs' dtypes
    x, w, t = make_inputs()
    x = x.to(DEVICE, torch.float32).requires_grad_()
    w = w.to(DEVICE, torch.float32).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = IMPLS[impl](x, w, t.to(DEVICE), softcap=15.0, chunk_size=32)
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    xb = x.detach().bfloat16().requires_grad_()
    wb = w.detach().clone().requires_grad_()
    ref = IMPLS[impl](xb, wb, t.to(DEVICE), softcap=15.0, chunk_size=32)
    ref.backward()
    assert loss.item() == ref.item()
    assert torch.equal(x.grad, xb.grad.float()) and torch.equal(w.grad, wb.grad)


def test_unsupported_cases_are_named(monkeypatch):
    assert head_torch.unsupported(DEVICE, torch.bfloat16) is None
    assert "dtype torch.float64" in head_torch.unsupported("cuda", torch.float64)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert "pip install triton" in head_torch.unsupported("cuda", torch.float32)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    assert "device cpu" in head_torch.unsupported("cpu", torch.float32)
    with pytest.raises(ValueError, match="device cpu .* use chunked_linear_cross_entropy"):  # a case it has, in fp32
        fused_linear_cross_entropy(*(t.float() if t.is_floating_point() else t for t in make_inputs(n=4, v=8)))


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_twice_with_retain_graph(impl):
    # the precomputed grads are saved tensors: backward must rescale copies, never them in place
    x, w, t = make_inputs()
    x = x.to(DEVICE, torch.float32).requires_grad_()
    loss = IMPLS[impl](x, w.to(DEVICE, torch.float32), t.to(DEVICE), softcap=15.0, chunk_size=32)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2, x)
    torch.testing.assert_close(g2, 2 * g1)


def test_scalars_are_runtime_kernel_args():
    # logit_mult / softcap change with width under muP: they must not be constexpr (recompile)
    for kernel in (head._logits_lse_kernel, head._dlogits_kernel):
        params = {p.name: p.is_constexpr for p in JITFunction(getattr(kernel, "fn", kernel)).params}
        assert params["logit_mult"] is False and params["softcap"] is False


class MaxNumel(TorchDispatchMode):
    """Largest tensor (in bytes: the interpreter moves kernel args as uint8 copies) made by any aten op."""

    def __init__(self):
        super().__init__()
        self.max_nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_nbytes = max(self.max_nbytes, o.nbytes)
        return out


@pytest.mark.parametrize("impl", CHUNKS)
def test_never_materialises_full_logits(impl):
    # every aten op of the op body (losses only, and losses + grads) under a dispatch hook; the
    # custom op itself would hide its internals from the hook
    n, d, v, chunk = 200, 16, 1003, 32
    x, w, t = make_inputs(n=n, d=d, v=v)
    x, w, t = x.to(DEVICE, torch.float32), w.to(DEVICE, torch.float32), t.to(DEVICE)
    with MaxNumel() as mode:
        for row_scale in (None, torch.ones(n, device=DEVICE)):
            head_torch.lce_chunks(x, w, t, row_scale, 0.5, 15.0, -1, chunk, CHUNKS[impl])
    assert mode.max_nbytes == 4 * max(chunk * v, v * d)  # the fp32 chunk buffer / grad_W, never n * v
    assert mode.max_nbytes < 4 * n * v


def test_default_chunk_size():
    size = head_torch.default_chunk_size
    assert size(8192, 512, 32768) * 32768 >= 8192 * 512
    assert size(8192, 512, 32768) < 8192
    assert size(10, 64, 1000) == 16  # small inputs: one chunk of at least 16 rows
    assert size(16384, 1024, 65536, "cuda") == 1024  # 256 MiB fp32 chunk on GPU


def test_opcheck():
    x, w, t = make_inputs(n=20, d=16, v=50)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    for reduction in ("sum", "none"):
        torch.library.opcheck(head_torch.CHUNKED_OP, (x, w, t, 0.5, 15.0, -1, reduction, 8))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    # aot_eager traces the op through its fake and autograd registration in ~1 s; inductor takes ~35 s
    torch._dynamo.reset()
    x, w, t = make_inputs()
    grad = out_grad("mean", N)
    kw = dict(logit_mult=0.25, softcap=15.0, chunk_size=32)
    f = torch.compile(fused_linear_cross_entropy, backend=backend, fullgraph=True)
    ref = run(eager_linear_cross_entropy, x, w, t, grad, torch.float64, **kw)
    got = run(f, x, w, t, grad, torch.float32, **kw)
    for a, r in zip(got, ref, strict=True):
        assert rel_err(a, r) < 1e-5


# -----------------------------------------------------------------------------
# GPU tier: real Triton, realistic shape, bf16


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_bf16_within_2x_torch_error(reduction):
    n, d, v = 4096, 1024, 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g) * 4
    w = torch.randn(v, d, device="cuda", generator=g) / d**0.5
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::13] = -1
    grad = torch.randn(n if reduction == "none" else (), device="cuda", generator=g)
    kw = dict(logit_mult=0.25, softcap=15.0, reduction=reduction)
    ref = run(eager_linear_cross_entropy, x, w, t, grad, torch.float32, **kw)
    base = run(eager_linear_cross_entropy, x, w, t, grad, torch.bfloat16, **kw)
    got = run(fused_linear_cross_entropy, x, w, t, grad, torch.bfloat16, **kw)
    for name, a, b, r in zip(("loss", "grad_x", "grad_W"), got, base, ref, strict=True):
        assert rel_err(a, r) <= 2 * rel_err(b, r) + 1e-5, (name, rel_err(a, r), rel_err(b, r))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scalar_change_does_not_recompile():
    x, w, t = (a.cuda() for a in make_inputs())
    x, w = x.bfloat16(), w.bfloat16()
    fused_linear_cross_entropy(x, w, t, logit_mult=1.0, softcap=0.0)
    jits = (head._logits_lse_kernel, head._dlogits_kernel)
    n_compiled = [sum(len(c[0]) for c in k.device_caches.values()) for k in jits]
    for mult, cap in [(0.5, 15.0), (0.125, 30.0)]:
        fused_linear_cross_entropy(x, w, t, logit_mult=mult, softcap=cap)
    assert [sum(len(c[0]) for c in k.device_caches.values()) for k in jits] == n_compiled
