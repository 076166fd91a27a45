"""The CUDA training path, emulated where there is no GPU: bf16 autocast + attn_impl=triton + head_impl=triton,
as scripts/base_train.py runs on CUDA, through Triton's interpreter on CPU (the compiled kernels on a GPU).
Also: which implementation `auto` picks, one-line errors for `triton` where it cannot run, torch.compile of the
model with both kernels. (Generation with the KV cache is tested in test_gpt.py.)"""

import pytest
import torch
from conftest import DEVICE

from nanochat.gpt import GPTConfig, build_model

# GQA 4:2, a sliding-window layer then a full one, muP (logit multiplier 1/2), softcap, head_dim 32
CFG = dict(sequence_len=40, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SL",
           short_window=20, mup_base_width=64, softcap=15.0)


def model(attn_impl, head_impl, device=DEVICE, **kw):
    """Same weights for every impl. The zero-init c_proj would leave attention without gradients and
    the readout's init is tiny, so both get small random values."""
    torch.manual_seed(0)
    m = build_model(GPTConfig(**{**CFG, **kw}, attn_impl=attn_impl, head_impl=head_impl), device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def batch(T=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (2, T), generator=g).to(DEVICE)
    y = torch.randint(0, 97, (2, T), generator=g).to(DEVICE)
    y[0, :3] = -1
    return x, y


def train_step(m, x, y, dtype):
    """base_train's step: forward under autocast (unless fp32), backward outside it, one optimizer step.
    Returns the loss and the grads of the step, then the loss after the update."""
    opt = m.setup_optimizer()
    autocast = torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        loss = m(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    m.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast:
        after = m(x, y)
    return loss.item(), grads, after.item()


def rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def test_bf16_autocast_training_step_matches_sdpa_eager():
    # flash-attn's rule at model level: against the fp32 SDPA/eager step, the bf16 Triton step's error is at
    # most 2x the error of the bf16 SDPA/eager step (plus a floor for entries that are pure rounding noise)
    x, y = batch()
    fp32 = train_step(model("sdpa", "eager"), x, y, torch.float32)
    ref = train_step(model("sdpa", "eager"), x, y, torch.bfloat16)
    tri = train_step(model("triton", "triton"), x, y, torch.bfloat16)
    assert abs(tri[0] - fp32[0]) <= 2 * abs(ref[0] - fp32[0]) + 1e-3 * fp32[0], (tri[0], ref[0], fp32[0])
    assert abs(tri[2] - fp32[2]) <= 2 * abs(ref[2] - fp32[2]) + 1e-3 * fp32[2], (tri[2], ref[2], fp32[2])
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])
    assert rel(flat(tri[1]), flat(fp32[1])) <= 2 * rel(flat(ref[1]), flat(fp32[1]))
    for name, g in fp32[1].items():  # per tensor, the floor is bf16's unit roundoff (2^-7): the 2-entry residual
        # scalars' errors are single rounding draws (measured 3e-3 SDPA vs 8e-3 Triton, ~1e-2 for the matrices)
        assert torch.isfinite(tri[1][name]).all() and tri[1][name].dtype == torch.float32, name
        # smear / backout lambdas: one nearly cancelling sum over every position, so their error is one rounding draw
        if g.numel() == 1:  # of that sum (smear_lambda measured 2e-2 Triton, 1e-3 SDPA): the flat check covers them
            continue
        err, ref_err = rel(tri[1][name], g), rel(ref[1][name], g)
        assert err <= 2 * ref_err + 2**-7, (name, err, ref_err)


def test_attention_gets_one_dtype_whatever_autocast_does_to_rms_norm(monkeypatch):
    # torch 2.13's CUDA autocast runs rms_norm in fp32 (CPU autocast and torch 2.11 keep bf16). Emulated here: the
    # QK-norm must still hand the attention op q, k, v in the compute dtype, as in the CPU emulation above
    import torch.nn.functional as F

    import nanochat.gpt as gpt

    rms, attn, seen = F.rms_norm, gpt.attention, []
    monkeypatch.setattr(F, "rms_norm", lambda x, *a, **kw: rms(x.float(), *a, **kw))  # fp32 out, as on CUDA
    monkeypatch.setattr(gpt, "attention", lambda q, k, v, *a: seen.append((q.dtype, k.dtype, v.dtype)) or attn(q, k, v,
                                                                                                            *a))
    x, y = batch()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        model("sdpa", "chunked")(x, y)
    assert seen == [(torch.bfloat16,) * 3] * CFG["n_layer"]


# -----------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize("n_embd", [128, 96])  # head_dim 32 (the kernel has it), 24 (it does not)
def test_auto_picks_per_case(n_embd, monkeypatch):
    import kernels.attention

    calls = []
    real = kernels.attention.flash_attention
    monkeypatch.setattr(kernels.attention, "flash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, y = batch()
    kw = dict(n_embd=n_embd, mup_base_width=n_embd // 2)  # base: half the heads, same head_dim
    auto = model("auto", "auto", **kw)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = auto(x, y)
    # Triton on CUDA where the kernel supports the case; on CPU always SDPA (the interpreter is for tests)
    assert len(calls) == (2 if DEVICE == "cuda" and n_embd == 128 else 0)
    if not calls:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            assert loss.item() == model("sdpa", "auto", **kw)(x, y).item()


def test_explicit_triton_on_unsupported_case_fails_in_one_line(monkeypatch):
    import kernels

    x, y = batch()
    for kw, impl, match in [(dict(n_embd=96, mup_base_width=48), "attn", r"head_dim=24 .*: use attn_impl='sdpa'"),
                            (dict(device="cpu"), "attn", r"device cpu .*: use attn_impl='sdpa'"),
                            (dict(device="cpu"), "head", r"device cpu .*: use head_impl='chunked'")]:
        monkeypatch.setattr(kernels, "INTERPRET", "device" not in kw)  # CPU without the interpreter
        m = model("triton" if impl == "attn" else "sdpa", "triton" if impl == "head" else "chunked", **kw)
        with pytest.raises(ValueError, match=match) as e:
            m(x.to(m.cos.device), y.to(m.cos.device))
        assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_with_both_kernels():
    # base_train on CUDA compiles the model; both kernels are torch.library ops, opaque to the compiler.
    # On CPU the kernels run in the interpreter inside inductor's graph. One layer keeps it cheap; still the
    # slowest fast test: measured 49 s with a cold inductor cache, 6 s warm (2 shared cores, load ~7).
    torch._dynamo.reset()
    x, y = batch()
    eager, compiled = model("triton", "triton", n_layer=1), model("triton", "triton", n_layer=1)
    fn = torch.compile(compiled, fullgraph=True, dynamic=False)
    losses = []
    for f in (eager, fn):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = f(x, y)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 1e-2 * losses[0], losses
    # inductor fuses the bf16 elementwise ops (fewer roundings), so compare within bf16 noise: matrices measured
    # 2e-3..7e-3 apart. The residual scalars are skipped: with one layer their exact gradient is ~0 (the norms
    # make the loss nearly scale-invariant), so their relative difference is pure rounding (measured 3e-2).
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if a.ndim == 2:
            assert rel(b.grad, a.grad) < 2**-6, (name, rel(b.grad, a.grad))
