"""Core tests: GPT construction, the muP switch, the role table and MuonAdamW."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from conftest import DEVICE

import nanochat.gpt as gpt_module
from nanochat.config import OptimConfig
from nanochat.engine import KVCache, generate
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import orthogonalize


def build(device="cpu", **kw):
    cfg = dict(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(GPTConfig(**cfg), device)


def batch(B=2, T=16, V=97, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g).to(device), torch.randint(0, V, (B, T), generator=g).to(device)


# ---------------------------------------------------------------------------------------------------
# construction, forward, init


def test_meta_build_and_init_follow_the_role_table():
    model = build(n_embd=128, n_head=2, mup_base_width=32, mup_base_head_dim=16)
    for row in model.param_rules():
        p = model.get_parameter(row["name"])
        assert p.device.type == "cpu" and torch.isfinite(p).all()
        if row["init_std"] is None:  # scalars and gates: fixed values (tests/test_recipe.py)
            fixed = torch.empty_like(p)
            torch.manual_seed(0)
            model.init_fixed(row["name"], fixed)
            assert row["role"] in ("scalar", "gate") or row["name"].endswith("ve_gate.weight")
            if p.ndim == 1:
                assert torch.equal(p, fixed), row["name"]
        elif row["init_std"] == 0.0:
            assert torch.all(p == 0), row["name"]
        else:
            assert p.std().item() == pytest.approx(row["init_std"], rel=0.05), row["name"]
    # the readout keeps SP's std; the muP forward multiplier 1/m = 1/4 shrinks its effective init like 1/width
    assert model.config.logit_mult == 0.25 and model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert model.cos.shape == (1, 32, 1, 32) and torch.isfinite(model.cos).all()


def test_forward_backward_shapes():
    model = build()
    x, y = batch()
    logits = model(x)
    assert logits.shape == (2, 16, 97) and logits.dtype == torch.float32
    loss = model(x, y)
    assert loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert model(x, y, reduction="none").shape == (2, 16)


def test_targets_minus_one_are_ignored():
    model = build()
    x, y = batch()
    y_masked = y.clone()
    y_masked[:, ::3] = -1
    per_token = model(x, y, reduction="none")
    keep = y_masked != -1
    assert model(x, y_masked).item() == pytest.approx(per_token[keep].mean().item(), rel=1e-6)
    assert torch.all(model(x, y_masked, reduction="none")[~keep] == 0)


def test_sp_and_mup_identical_at_base_width():
    # attn_mult = sqrt(head_dim) makes attn_mult/head_dim equal SP's 1/sqrt(head_dim)
    sp = build(n_embd=128, n_head=2, attn_mult=8.0)
    mup = build(n_embd=128, n_head=2, attn_mult=8.0, mup_base_width=128)
    mup.load_state_dict(sp.state_dict())
    nn.init.normal_(sp.lm_head.weight, std=0.5)
    mup.lm_head.weight.data.copy_(sp.lm_head.weight)
    x, _ = batch()
    assert torch.equal(sp(x), mup(x))
    assert mup.config.width_mult == 1.0 and mup.config.logit_mult == 1.0


def test_init_logits_shrink_like_width_to_the_minus_half_under_mup_and_grow_under_sp():
    # readout std 0.001 in both modes; muP's 1/m multiplier makes its effective variance ~1/n^2 (TP5 Table 3), so
    # the init logits (sums of n independent terms) go like n^-1/2 under muP and n^+1/2 under SP
    x, _ = batch(B=4, T=32, seed=1)
    for base, slope in ((64, -0.5), (0, 0.5)):
        std = [build(n_embd=n, n_head=n // 32, mup_base_width=base)(x).std().item() for n in (64, 1024)]
        assert math.log2(std[1] / std[0]) / 4 == pytest.approx(slope, abs=0.05), (base, std)


@pytest.mark.parametrize("use_mup", [False, True])
def test_attention_scale_follows_head_dim(use_mup, monkeypatch):
    seen = []
    real = gpt_module.attention
    monkeypatch.setattr(gpt_module, "attention", lambda q, k, v, scale, *a: seen.append((q.size(-1), scale))
                        or real(q, k, v, scale, *a))
    for n_head in (4, 2):  # head_dim 16 then 32 at the same width
        model = build(n_embd=64, n_head=n_head, n_kv_head=n_head, mup_base_width=32 if use_mup else 0,
                      attn_mult=3.0)
        model(batch()[0])
    assert {d for d, _ in seen} == {16, 32}
    for d, scale in seen:
        assert scale == pytest.approx(1.2**2 * (3.0 / d if use_mup else d**-0.5))  # qk_gain 1.2 on q and k


def test_sliding_window_limits_what_a_query_sees():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    out = gpt_module.attention(q, k, v, 0.3, 4, "sdpa")
    v2 = v.clone()
    v2[:, 5] += 10.0  # only queries 5..9 may see position 5
    out2 = gpt_module.attention(q, k, v2, 0.3, 4, "sdpa")
    changed = (out2 - out).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert build(n_layer=3, window_pattern="S", short_window=16).windows == [16, 16, None]  # last layer always full


# ---------------------------------------------------------------------------------------------------
# roles, the table and the optimizer


def group_of(opt, name):
    hits = [g for g in opt.param_groups if name in g["names"]]
    assert len(hits) == 1, name
    return hits[0]


def test_optim_config_defaults_and_keyword_overrides():
    model = build(n_embd=64, n_head=2)
    cq = "transformer.h.0.attn.c_q.weight"

    def lrs(*a, **kw):
        return {r["name"]: r["lr"] for r in model.param_rules(*a, **kw)}

    assert lrs()[cq] == 0.02 and lrs(matrix_optimizer="adamw")[cq] == 0.003  # nanochat's defaults (SP: r_in = 1)
    assert lrs(OptimConfig(), matrix_optimizer="adamw")[cq] == 0.003  # the default follows a replaced optimizer
    assert model.param_rules(matrix_lr=0.01, weight_decay=0.1) == model.param_rules(
        OptimConfig(matrix_lr=0.01, weight_decay=0.1))
    with pytest.raises(ValueError, match="matrix_optimizer='sgd'"):
        model.param_rules(matrix_optimizer="sgd")


@pytest.mark.parametrize("matrix_optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("base", [0, 32])
def test_table_matches_optimizer_groups(matrix_optimizer, base):
    model = build(n_embd=128, n_head=2, mup_base_width=base, mup_base_head_dim=16 if base else 0)
    kw = dict(matrix_lr=0.01, weight_decay=0.1, matrix_optimizer=matrix_optimizer)
    rows = model.param_rules(**kw)
    opt = model.setup_optimizer(**kw)
    assert sorted(r["name"] for r in rows) == sorted(n for n, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(rows)
    for r in rows:
        g = group_of(opt, r["name"])
        assert any(p is model.get_parameter(r["name"]) for p in g["params"])
        assert (g["kind"], g["lr"], g["base_lr"], g["weight_decay"]) == (r["optimizer"], r["lr"], r["lr"], r["wd"])
        assert g.get("eps") == r["eps"]


def rules(n_embd, base, matrix_optimizer):
    model = build(n_embd=n_embd, n_head=n_embd // 32, n_kv_head=n_embd // 32, mup_base_width=base)
    rows = model.param_rules(matrix_lr=0.01, weight_decay=0.1, matrix_optimizer=matrix_optimizer)
    return {r["name"]: r for r in rows}


def test_mup_rules_across_width():
    for opt in ("muon", "adamw"):
        a, b = rules(64, 32, opt), rules(256, 32, opt)  # m = 2 and 8
        q, head, emb = "transformer.h.0.attn.c_q.weight", "lm_head.weight", "transformer.wte.weight"
        assert b[head]["lr"] == a[head]["lr"]  # readout LR constant: the 1/m is in the forward only
        assert b[head]["eps"] == pytest.approx(a[head]["eps"] / 4)
        assert b[head]["fwd_mult"] == pytest.approx(a[head]["fwd_mult"] / 4)
        assert b[emb]["lr"] == a[emb]["lr"] and b[emb]["eps"] == pytest.approx(a[emb]["eps"] / 4)  # grad ~ 1/m
        assert b["x0_lambdas"]["lr"] == a["x0_lambdas"]["lr"] and b["x0_lambdas"]["wd"] == 0.0
        if opt == "muon":
            assert b[q]["lr"] == a[q]["lr"] == 0.01
            fc = "transformer.h.0.mlp.c_fc.weight"
            assert b[fc]["update_scale"] == 2.0 and b["transformer.h.0.mlp.c_proj.weight"]["update_scale"] == 1.0
        else:
            assert a[q]["lr"] == pytest.approx(0.01 / 2) and b[q]["lr"] == pytest.approx(0.01 / 8)
            assert b[q]["eps"] == pytest.approx(a[q]["eps"] / 4)
            assert b[q]["lr"] * b[q]["wd"] == pytest.approx(a[q]["lr"] * a[q]["wd"])  # decay per step invariant


def test_sp_rules_across_width():
    muon64 = rules(64, 0, "muon")
    vector_like = {n for n, r in muon64.items() if r["role"] in ("embedding", "value_emb", "readout")}
    assert {"transformer.wte.weight", "lm_head.weight"} <= vector_like
    for opt in ("muon", "adamw"):  # nanochat's (n_embd/768)^-0.5 on the embeddings and the readout, in both setups
        a, b = rules(64, 0, opt), rules(256, 0, opt)
        for n in vector_like:
            assert a[n]["lr"] == pytest.approx(muon64[n]["lr"])  # the setups share these groups
            assert b[n]["lr"] == pytest.approx(a[n]["lr"] / 2)
        if opt == "adamw":  # every other AdamW LR and eps is width-constant in SP
            assert all(a[n]["lr"] == b[n]["lr"] and a[n]["eps"] == b[n]["eps"] for n in a if n not in vector_like)
    assert a["lm_head.weight"]["init_std"] == 0.001


def test_setup_optimizer_rejects_contradictions():
    sp, mup = build(), build(mup_base_width=32)
    before = copy.deepcopy(mup.config)
    with pytest.raises(ValueError, match="use_mup=True"):
        sp.setup_optimizer(use_mup=True, base_width=32)
    with pytest.raises(ValueError, match="use_mup=False"):
        mup.setup_optimizer(use_mup=False)
    with pytest.raises(ValueError, match="base_width=64"):
        mup.setup_optimizer(base_width=64)
    with pytest.raises(ValueError, match="matrix_optimizer"):
        mup.setup_optimizer(matrix_optimizer="sgd")
    assert mup.config == before and sp.config.mup_base_width == 0
    sp.setup_optimizer(use_mup=False, base_width=999)  # base_width ignored under SP
    mup.setup_optimizer(use_mup=True, base_width=32)


def test_parameter_without_role_raises():
    model = build()
    model.transformer.h[0].attn.gate = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="transformer.h.0.attn.gate has no muP role"):
        model.setup_optimizer()


def test_muon_update_is_orthogonal_and_shape_scaled():
    model = build(n_embd=64, n_head=2)
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # a Gaussian gradient: singular values spread far apart
    lr = 0.01
    # without NorMuon (which reweights rows at a fixed Frobenius norm) and decay: the polar factor alone
    opt = model.setup_optimizer(matrix_lr=lr, normuon_beta2=0.0, weight_decay=0.0)
    fc = model.transformer.h[0].mlp.c_fc.weight
    q = model.transformer.h[0].attn.c_q.weight
    before = {n: p.detach().clone() for n, p in (("fc", fc), ("q", q))}
    raw = torch.linalg.svdvals(q.grad)
    opt.step()
    sv_fc = torch.linalg.svdvals(before["fc"] - fc.detach()) / lr
    sv_q = torch.linalg.svdvals(before["q"] - q.detach()) / lr
    assert raw.max() / raw.min() > 5  # the raw gradient is far from orthogonal ...
    # ... its update is near-orthogonal (5 Polar Express steps leave singular values in about [0.7, 1.2])
    def near_one(s):
        return s.min() > 0.7 and s.max() < 1.2 and 0.9 < s.median() < 1.1

    assert near_one(sv_q)
    assert near_one(sv_fc / 2)  # c_fc is 4d x d: scaled by sqrt(4)
    assert near_one(torch.linalg.svdvals(orthogonalize(torch.randn(3, 48, 16))))


def test_adamw_groups_match_torch_adamw():
    model = build(n_embd=64, n_head=2, mup_base_width=32)
    ref = copy.deepcopy(model)
    kw = dict(embedding_lr=0.05, unembedding_lr=0.02, scalar_lr=0.1, weight_decay=0.3, adam_eps=1e-6,
              matrix_optimizer="adamw")
    ours = model.setup_optimizer(**kw)
    groups = [dict(params=[ref.get_parameter(n) for n in g["names"]], lr=g["lr"], betas=g["betas"], eps=g["eps"],
                   weight_decay=g["weight_decay"]) for g in ours.param_groups]
    theirs = torch.optim.AdamW(groups)
    for step in range(3):
        for m, opt in ((model, ours), (ref, theirs)):
            x, y = batch(seed=step)
            m(x, y).backward()
            opt.step()
            m.zero_grad(set_to_none=True)
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("base", [0, 32])
@pytest.mark.parametrize("matrix_optimizer", ["muon", "adamw"])
def test_two_layer_model_overfits_one_batch(base, matrix_optimizer):
    model = build(n_embd=64, n_head=2, mup_base_width=base)
    opt = model.setup_optimizer(matrix_optimizer=matrix_optimizer, unembedding_lr=0.02)
    x, y = batch(B=4, T=32)
    first = model(x, y).item()
    for _ in range(60):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    assert first > 4.0 and loss.item() < 0.1 * first


# ---------------------------------------------------------------------------------------------------
# config validation


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_embd=65), "n_embd=65 is not divisible by GPTConfig.n_head=2"),
        (dict(n_kv_head=3, n_head=6, n_embd=60), None),  # valid-looking but 6 % 3 == 0: must pass
        (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by GPTConfig.n_kv_head=3"),
        (dict(n_embd=6, n_head=2, n_kv_head=2), "head_dim=3"),
        (dict(window_pattern="LSX"), "window_pattern='LSX'"),
        (dict(window_pattern=""), "window_pattern=''"),
        (dict(mup_base_width=-1), "mup_base_width=-1"),
        (dict(n_layer=0), "n_layer=0"),
        (dict(vocab_size=-5), "vocab_size=-5"),
        (dict(sequence_len=0), "sequence_len=0"),
        (dict(attn_mult=-1.0), "attn_mult=-1.0"),
        (dict(output_mult=float("nan")), "output_mult=nan"),
        (dict(softcap=-1.0), "softcap=-1.0"),
    ],
)
def test_bad_config_raises(kw, match):
    cfg = dict(n_head=2, n_kv_head=1, n_embd=64)
    cfg.update(kw)
    if match is None:
        GPTConfig(**cfg)
        return
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        GPTConfig(**cfg)


def test_triton_and_sdpa_attention_give_the_same_model():
    # GQA, a sliding-window layer and a T that is not a multiple of the kernel's tile
    kw = dict(sequence_len=40, n_embd=64, n_head=2, n_kv_head=1, n_layer=2, window_pattern="SL", short_window=20,
              mup_base_width=32)
    ref = build(attn_impl="sdpa", **kw)
    tri = build(attn_impl="triton", **kw)
    tri.load_state_dict(ref.state_dict())
    for m in (ref, tri):
        torch.nn.init.normal_(m.lm_head.weight, std=0.02, generator=torch.Generator().manual_seed(0))
        for blk in m.transformer.h:  # non-zero out-projections so attention matters
            torch.nn.init.normal_(blk.attn.c_proj.weight, std=0.05, generator=torch.Generator().manual_seed(1))
    ref, tri = ref.to(DEVICE), tri.to(DEVICE)
    x, y = batch(T=37, device=DEVICE)
    torch.testing.assert_close(tri(x), ref(x), rtol=1e-4, atol=1e-5)
    ref(x, y).backward()
    tri(x, y).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_heads_match_eager_and_hooks_still_fire(reduction):
    kw = dict(n_embd=64, n_head=2, mup_base_width=16, mup_base_head_dim=8, softcap=15.0, smear=False)
    models = {impl: build(head_impl=impl, **kw) for impl in ("eager", "chunked", "triton")}
    for m in models.values():
        m.load_state_dict(models["eager"].state_dict())
        torch.nn.init.normal_(m.lm_head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        m.to(DEVICE)
    x, y = batch(T=15, device=DEVICE)
    y[0, :5] = -1
    losses = {impl: m(x, y, reduction=reduction) for impl, m in models.items()}
    for impl in ("chunked", "triton"):
        torch.testing.assert_close(losses[impl], losses["eager"], rtol=1e-5, atol=1e-6)
        g = torch.randn_like(losses[impl])
        losses[impl].backward(g)
        models[impl].lm_head.weight.grad, eager_grad = None, models[impl].lm_head.weight.grad
        losses["eager"].backward(g, retain_graph=True)
        torch.testing.assert_close(eager_grad, models["eager"].lm_head.weight.grad, rtol=1e-5, atol=1e-7)
        models["eager"].zero_grad(set_to_none=True)
    # a forward hook on lm_head (coord checks) sees the raw logits even when targets are given
    seen = []
    model = models["chunked"].eval()
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    torch.testing.assert_close(model(x, y, reduction=reduction), losses["eager"].detach(), rtol=1e-5, atol=1e-6)
    assert seen == [(2, 15, 128)]  # the raw output: vocab 97 padded to 128 rows


# ---------------------------------------------------------------------------------------------------
# generation with the KV cache


def generation_model():
    # GQA 4:2, two sliding-window layers (window 16 < sequence_len 32), head_dim 32: on CUDA `auto` runs the
    # prefill through the Triton kernel and the decode steps through SDPA, on CPU both through SDPA
    model = build(DEVICE, n_layer=3, window_pattern="SSL", short_window=16, n_head=4, n_kv_head=2, n_embd=128)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero out-projections would hide attention, the 0.001 readout flatten every logit
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_kv_cache_forward_matches_full_forward():
    model = generation_model()
    ids = torch.randint(0, 97, (2, 27), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.n_layer, model.config.sequence_len)
        steps = [model(ids[:, :9], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 27)]
        assert cache.pos == 27
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="input length 33 exceeds"):
            model(ids[:, :6], kv_cache=cache)


@pytest.mark.parametrize("prompt_len", [5, 30])
def test_kv_cache_greedy_generation_matches_no_cache(prompt_len):
    # prompt 30 of sequence_len 32: two cached steps, then the context slides and every step is a full forward
    model = generation_model()
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    lengths = []
    model.transformer.wte.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].size(1)))
    cached = generate(model, prompt, 12, temperature=0)
    assert lengths == [min(prompt_len + i, 32) if i == 0 or prompt_len + i > 32 else 1 for i in range(12)]
    assert cached == generate(model, prompt, 12, temperature=0, use_cache=False)
    assert len(set(cached)) > 3  # a real continuation, not one repeated token
