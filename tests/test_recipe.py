"""nanochat master's recipe (karpathy/nanochat 92d63d4): each model feature, each Muon addition and the schedules,
behind their GPTConfig / OptimConfig fields. All CPU, a few seconds."""

import math

import pytest
import torch

import nanochat.gpt as gpt_module
from nanochat.config import GPTConfig, OptimConfig
from nanochat.gpt import build_model, norm
from nanochat.optim import muon_apply, muon_update, normuon


def build(**kw):
    cfg = dict(sequence_len=32, vocab_size=97, n_layer=4, n_head=2, n_kv_head=1, n_embd=64)
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(GPTConfig(**cfg), "cpu")


def tokens(B=2, T=16, V=97, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# model


@pytest.mark.parametrize("n_layer, layers", [(4, [1, 3]), (3, [0, 2]), (1, [0])])
def test_value_embeddings_on_alternating_layers_the_last_included(n_layer, layers):
    model = build(n_layer=n_layer)
    assert sorted(map(int, model.value_embeds)) == layers
    assert [i for i, b in enumerate(model.transformer.h) if b.attn.ve_gate is not None] == layers
    assert model.value_embeds[str(layers[0])].weight.shape == (128, 32)  # padded vocab x (kv heads x head_dim)
    off = build(n_layer=n_layer, value_embeds=False)
    assert len(off.value_embeds) == 0 and all(b.attn.ve_gate is None for b in off.transformer.h)


def test_value_embedding_is_added_to_v_through_the_gate(monkeypatch):
    model = build(n_layer=1, n_kv_head=2)
    seen = []
    real = gpt_module.attention
    monkeypatch.setattr(gpt_module, "attention", lambda q, k, v, *a: seen.append(v) or real(q, k, v, *a))
    x = tokens()
    with torch.no_grad():
        model.transformer.h[0].attn.ve_gate.weight.zero_()  # gate = 3 * sigmoid(0) = 1.5 for every head
        model(x)
        ve = model.value_embeds["0"].weight[x].view(2, 16, 2, 32)
        model.value_embeds["0"].weight.zero_()
        model(x)
    torch.testing.assert_close(seen[0] - seen[1], 1.5 * ve)


def test_smear_mixes_in_the_previous_embedding_through_its_gate():
    model = build()
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
        x = torch.randn(2, 5, 64)
        out = model._smear(x, None)
    gate = 0.7 * torch.sigmoid(model.smear_gate(x[:, 1:, :24]))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # the first position has no predecessor
    torch.testing.assert_close(out[:, 1:], x[:, 1:] + gate * x[:, :-1])
    assert not hasattr(build(smear=False), "smear_gate")


def test_backout_subtracts_the_middle_layers_residual():
    model = build(n_layer=4)
    seen = {}
    model.transformer.h[2].register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))  # n_layer // 2
    model.transformer.h[3].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o))
    model.lm_head.register_forward_pre_hook(lambda m, i: seen.__setitem__("head_in", i[0]))
    with torch.no_grad():
        model.backout_lambda.fill_(0.5)
        model(tokens())
    torch.testing.assert_close(seen["head_in"], norm(seen["last"] - 0.5 * seen["mid"]))
    assert not hasattr(build(backout=False), "backout_lambda")


@pytest.mark.parametrize("n_layer", [1, 2])
def test_no_backout_where_the_middle_block_is_the_last(n_layer):
    # there x - lambda x is a rescale the final norm removes, except for the sign flip at lambda = 1
    assert build(n_layer=n_layer, backout=True).config.has_backout is False
    assert not hasattr(build(n_layer=n_layer), "backout_lambda") and hasattr(build(n_layer=3), "backout_lambda")


def test_scalar_init_ramps_over_the_layers():
    model = build(n_layer=5)
    torch.testing.assert_close(model.resid_lambdas.data, torch.tensor([1.15, 1.125, 1.1, 1.075, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.data, torch.tensor([0.2, 0.1625, 0.125, 0.0875, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    flat = build(n_layer=5, scalar_init="flat")
    assert torch.all(flat.resid_lambdas == 1) and torch.all(flat.x0_lambdas == 0)
    one = build(n_layer=1)
    assert one.resid_lambdas.item() == pytest.approx(1.15) and one.x0_lambdas.item() == pytest.approx(0.2)


def test_gates_start_slightly_open():
    model = build(n_embd=128, n_head=4, n_kv_head=4)
    for w in (model.smear_gate.weight, model.transformer.h[1].attn.ve_gate.weight):
        assert w.min() >= 0 and w.max() < 0.02 and w.std() > 0


@pytest.mark.parametrize("mup", [0, 32])
def test_qk_gain_sharpens_the_attention_scale(mup):
    kw = dict(n_embd=64, n_head=2, n_kv_head=2, mup_base_width=mup, attn_mult=2.0)
    assert GPTConfig(**kw).attn_scale == pytest.approx(1.44 * GPTConfig(**kw, qk_gain=1.0).attn_scale)
    assert GPTConfig(**kw, qk_gain=1.0).attn_scale == pytest.approx(2.0 / 32 if mup else 32**-0.5)  # muP: 1/d


def test_rotary_base():
    model = build(n_embd=64, n_head=2)
    t, i = 7, 3
    assert model.cos[0, t, 0, i].item() == pytest.approx(math.cos(t / 100000 ** (2 * i / 32)), rel=1e-5)
    other = build(n_embd=64, n_head=2, rope_base=10000.0)
    assert other.cos[0, t, 0, i].item() == pytest.approx(math.cos(t / 10000 ** (2 * i / 32)), rel=1e-5)


@pytest.mark.parametrize("head_impl", ["eager", "chunked"])
def test_padded_vocab_rows_are_never_scored(head_impl):
    model = build(head_impl=head_impl)
    assert model.lm_head.weight.shape[0] == model.transformer.wte.weight.shape[0] == 128  # 97 -> 128
    x, y = tokens(), tokens(seed=1)
    loss = model(x, y)
    assert model(x).shape == (2, 16, 97)
    with torch.no_grad():
        model.lm_head.weight[97:] = 100.0  # would dominate every softmax if they were scored
    assert model(x, y).item() == loss.item()
    assert build(pad_vocab_to=1).lm_head.weight.shape[0] == 97


@pytest.mark.parametrize("T, short", [(256, 128), (1024, 256), (2048, 512), (4096, 1024)])
def test_short_window_is_a_quarter_context_in_whole_tiles(T, short):
    cfg = GPTConfig(sequence_len=T, n_layer=5, n_embd=64, n_head=2, n_kv_head=2)
    assert cfg.windows() == [short, short, short, None, None]  # SSSL tiled, the last layer always full
    assert GPTConfig(sequence_len=64, n_layer=2, n_embd=64, n_head=2, n_kv_head=2).windows() == [None, None]
    assert GPTConfig(sequence_len=T, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, short_window=16).windows()[0] == 16


def test_nanochat_inits():
    model = build(n_embd=256, n_head=4, n_kv_head=4, n_layer=2, vocab_size=4000)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.02)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.4 / 16, rel=0.02)
    assert model.value_embeds["1"].weight.std().item() == pytest.approx(1 / 16, rel=0.02)  # c_v's std
    assert model.transformer.h[0].attn.c_q.weight.std().item() == pytest.approx(1 / 16, rel=0.02)


def test_features_off_give_the_plain_model():
    off = dict(value_embeds=False, smear=False, backout=False)
    names = {n for n, _ in build(**off).named_parameters()}
    assert names == {n for n, _ in build().named_parameters()
                     if not n.startswith("value_embeds") and "gate" not in n and "smear" not in n
                     and "backout" not in n}


@pytest.mark.parametrize("kw, match", [(dict(n_embd=16, n_head=2, n_kv_head=2), "smear=True reads the first 24"),
                                       (dict(n_embd=8, n_head=2, n_kv_head=2, smear=False), "value_embeds=True"),
                                       (dict(scalar_init="zero"), "scalar_init='zero'"),
                                       (dict(pad_vocab_to=0), "pad_vocab_to=0"),
                                       (dict(qk_gain=0.0), "qk_gain=0.0")])
def test_bad_feature_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**dict(n_embd=64, n_head=2, n_kv_head=2), **kw})


# ---------------------------------------------------------------------------------------------------
# Muon's additions


def muon_group(**kw):
    return dict(dict(momentum=0.9, beta2=0.9, eq=True, renorm=True, cautious=True, weight_decay=0.0,
                     update_scale=1.0), **kw)


@pytest.mark.parametrize("shape", [(3, 48, 16), (3, 16, 48), (2, 32, 32)])
def test_normuon_equalises_rows_at_the_same_frobenius_norm(shape):
    torch.manual_seed(0)
    u = torch.randn(shape) * torch.linspace(0.1, 3, shape[1])[:, None]  # rows of very different sizes
    out = normuon(u, {}, 0.9)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), u.norm(dim=(-2, -1)))
    dim = -1 if shape[1] >= shape[2] else -2  # per row (tall, square) or per column (wide)
    rms = out.square().mean(dim=dim)
    torch.testing.assert_close(rms, rms.mean(dim=-1, keepdim=True).expand_as(rms))


def test_renormalised_muon_update_has_an_orthogonal_matrix_frobenius_norm():
    torch.manual_seed(0)
    for shape in ((2, 48, 16), (2, 16, 48)):
        u = muon_update(torch.randn(shape), {}, muon_group(beta2=0.0))
        torch.testing.assert_close(u.norm(dim=(-2, -1)), torch.full((2,), 16**0.5))
        svals = torch.linalg.svdvals(u)
        assert svals.min() > 0.6 and svals.max() < 1.3  # near-orthogonal


def test_muon_eq_changes_only_the_input_conditioning():
    torch.manual_seed(0)
    g = torch.randn(1, 32, 16) * torch.logspace(-2, 1, 32)[:, None]  # badly scaled rows
    eq = muon_update(g.clone(), {}, muon_group(beta2=0.0))
    plain = muon_update(g.clone(), {}, muon_group(beta2=0.0, eq=False))
    assert not torch.allclose(eq, plain)
    torch.testing.assert_close(eq.norm(), plain.norm())  # both renormalised to sqrt(16)


def test_cautious_decay_only_where_update_and_weight_agree():
    p = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    u = torch.tensor([[0.5, -0.5, 0.5, -0.5]])
    a, b = p.clone(), p.clone()
    muon_apply(a, u, 0.1, muon_group(weight_decay=0.5))
    muon_apply(b, u, 0.1, muon_group(weight_decay=0.5, cautious=False))
    torch.testing.assert_close(a, p - 0.1 * u - 0.05 * p * torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(b, p - 0.1 * u - 0.05 * p)


def test_muon_decay_is_nanochats_lr_times_shape_factor():
    # nanochat decays by lr x max(1, rows/cols)^0.5 x wd: c_fc (4d x d) gets twice the square matrices' decay
    model = build(n_embd=64, n_head=2, n_kv_head=2)
    rows = {r["name"]: r for r in model.param_rules(weight_decay=0.3)}
    assert rows["transformer.h.0.mlp.c_fc.weight"]["wd"] == pytest.approx(0.6)
    assert rows["transformer.h.0.attn.c_q.weight"]["wd"] == pytest.approx(0.3)


def test_adamw_groups_carry_nanochats_betas_and_decays():
    model = build(n_embd=64, n_head=2, n_kv_head=2)
    rows = {r["name"]: r for r in model.param_rules(embedding_lr=0.2)}
    want = {"transformer.wte.weight": ((0.8, 0.995), 0.001), "value_embeds.1.weight": ((0.8, 0.995), 0.01),
            "lm_head.weight": ((0.8, 0.96), 0.01), "resid_lambdas": ((0.8, 0.95), 0.05),
            "x0_lambdas": ((0.96, 0.95), 0.0), "smear_gate.weight": ((0.8, 0.95), 0.0)}
    for name, (betas, wd) in want.items():
        assert (rows[name]["betas"], rows[name]["wd"]) == (betas, wd), name
    assert rows["value_embeds.1.weight"]["lr"] == pytest.approx(0.5 * rows["transformer.wte.weight"]["lr"])
    assert rows["smear_gate.weight"]["lr"] == rows["backout_lambda"]["lr"] == 0.2  # gate_lr, not width-scaled
    assert rows["transformer.h.1.attn.ve_gate.weight"]["optimizer"] == "muon"


# ---------------------------------------------------------------------------------------------------
# schedules


def test_lr_schedule_warmup_flat_warmdown():
    h = OptimConfig()
    n = 200  # warmdown over the last 130 steps, from step 70
    assert h.lr_mult(0, n) == pytest.approx(1 / 40) and h.lr_mult(39, n) == 1.0 and h.lr_mult(69, n) == 1.0
    assert h.lr_mult(70, n) == 1.0 and h.lr_mult(135, n) == pytest.approx(0.5 + 0.5 * 0.05)
    assert h.lr_mult(199, n) == pytest.approx(1 / 130 + (1 - 1 / 130) * 0.05)
    assert OptimConfig(warmup_steps=0).lr_mult(0, n) == 1.0


def test_momentum_and_weight_decay_schedules():
    h = OptimConfig()
    assert h.momentum(0, 2000) == 0.85 and h.momentum(200, 2000) == pytest.approx(0.91)
    assert h.momentum(400, 2000) == 0.97 and h.momentum(700, 2000) == 0.97  # warmdown starts at 700
    assert h.momentum(1350, 2000) == pytest.approx(0.935) and h.momentum(100, 200) == pytest.approx(0.88)
    assert h.wd_mult(0, 100) == 1.0 and h.wd_mult(50, 100) == pytest.approx(0.5) and h.wd_mult(100, 100) < 1e-12
    assert OptimConfig(wd_schedule="constant").wd_mult(50, 100) == 1.0
