"""muP rules derived from shapes relative to the base (issue 11): width classes, GQA with fixed kv heads, width
through head_dim, base-width equivalence for any head_dim, scalar / embedding rules, weight decay, the recorded
base config and its refusals, and the per-matrix Muon spectral check. All CPU, a few seconds in total."""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import ROOT

from nanochat.coord_check import coord_config, muon_step_spectral, param_kind
from nanochat.gpt import GPTConfig, build_model
from nanochat.report import print_role_table

CK, CV, CQ = "transformer.h.0.attn.c_k.weight", "transformer.h.0.attn.c_v.weight", "transformer.h.0.attn.c_q.weight"
FC, EMB, HEAD = "transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight", "lm_head.weight"


def gpt(**kw):
    cfg = dict(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    cfg.update(kw)
    return build_model(GPTConfig(**cfg), "meta")


def rules(model, **kw):
    return {r["name"]: r for r in model.param_rules(**kw)}


# ---------------------------------------------------------------------------------------------------
# 1. classes and derived numbers


def test_gqa_fixed_kv_heads_makes_c_k_c_v_output_like():
    # head_dim 32, one kv head at every width: c_k / c_v are 32 x n_embd, fan_in grows, fan_out does not
    base, wide, wider = (gpt(n_embd=w, n_head=w // 32, n_kv_head=1, mup_base_width=64) for w in (64, 256, 1024))
    classes = {n: s["cls"] for n, s in wide.param_shapes().items()}
    assert classes[CK] == classes[CV] == "output" and classes[HEAD] == "output"
    assert classes[CQ] == classes[FC] == "hidden" and classes[EMB] == "input"
    assert classes["resid_lambdas"] == classes["x0_lambdas"] == "fixed"
    for opt in ("muon", "adamw"):
        b, w, ww = (rules(m, matrix_optimizer=opt, weight_decay=0.1) for m in (base, wide, wider))
        assert w[CK]["init_std"] == pytest.approx(b[CK]["init_std"] / 4)  # ~1/fan_in (TP5 output weights)
        assert w[CQ]["init_std"] == pytest.approx(b[CQ]["init_std"] / 2)  # ~1/sqrt(fan_in)
        if opt == "muon":
            # spectral condition: ||dW||_2 ~ sqrt(fan_out/fan_in) halves per 4x width; the old square-matrix rule
            # max(1, fo/fi)^0.5 kept it at 1 (issue 11)
            assert (b[CK]["update_scale"], w[CK]["update_scale"], ww[CK]["update_scale"]) == (1.0, 0.5, 0.25)
            assert b[CQ]["update_scale"] == w[CQ]["update_scale"] == 1.0 and w[FC]["update_scale"] == 2.0
            assert w[CK]["lr"] == b[CK]["lr"] and w[CK]["wd"] == b[CK]["wd"]
        else:
            assert w[CK]["lr"] == pytest.approx(b[CK]["lr"] / 4) and w[CQ]["lr"] == pytest.approx(b[CQ]["lr"] / 4)
            assert w[CK]["lr"] * w[CK]["wd"] == pytest.approx(b[CK]["lr"] * b[CK]["wd"])
            # gradient entries scale like 1/fan_out: c_k's fan_out is fixed, so its eps is too; c_q's is eps/m
            assert w[CK]["eps"] == b[CK]["eps"] and w[CQ]["eps"] == pytest.approx(b[CQ]["eps"] / 4)


def test_kv_heads_that_grow_with_heads_stay_hidden():
    model = gpt(n_embd=256, n_head=8, n_kv_head=4, mup_base_width=64, mup_base_n_kv_head=1)  # kv ratio 2 kept
    s = model.param_shapes()
    assert s[CK]["cls"] == "hidden" and s[CK]["r_out"] == s[CK]["r_in"] == 4
    assert rules(model)[CK]["update_scale"] == 1.0


def test_unclassifiable_parameter_raises():
    model = gpt(mup_base_width=32, mup_base_head_dim=16)
    model.transformer.h[0].attn.register_parameter("gate", torch.nn.Parameter(torch.zeros(3, device="meta")))
    with pytest.raises(ValueError, match="gate has no muP role"):
        model.param_rules()


def test_role_table_prints_class_and_base(capsys):
    model = gpt(n_embd=128, n_head=4, n_kv_head=1, mup_base_width=64)
    print_role_table(model, model.param_rules())
    out = capsys.readouterr().out
    assert "base: width 64, head_dim 32, 2 heads, 1 kv heads, 1 layers; m=2" in out
    line = next(ln for ln in out.splitlines() if ln.startswith(CK))
    assert line.split()[1:5] == ["matrix", "output", "32x128", "32x64"] and line.split()[-1] == "0.7071"


# ---------------------------------------------------------------------------------------------------
# 2. base width: every multiplier is 1 (muP == SP) whatever the head_dim; width through head_dim


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("kv", [0, 1])
def test_mup_equals_sp_at_the_base_width_for_any_head_dim(head_dim, kv):
    width = 2 * max(head_dim, 64)
    kw = dict(n_embd=width, n_head=width // head_dim, n_kv_head=kv or width // head_dim)
    sp, mup = gpt(**kw), gpt(**kw, mup_base_width=width)
    assert mup.config.attn_scale == pytest.approx(sp.config.attn_scale, rel=1e-12)
    assert mup.config.attn_mult == pytest.approx(math.sqrt(head_dim)) and mup.config.logit_mult == 1.0
    for opt in ("muon", "adamw"):
        a, b = rules(sp, matrix_optimizer=opt, weight_decay=0.1), rules(mup, matrix_optimizer=opt, weight_decay=0.1)
        for name in a:
            for key in ("lr", "eps", "wd", "fwd_mult", "update_scale", "init_std"):
                assert a[name].get(key) == b[name].get(key), (name, key)


def coord_model(*args, **kw):
    torch.manual_seed(0)
    return build_model(coord_config(*args, **kw))


def test_sp_and_mup_forward_identical_at_base_width_any_head_dim():
    for head_dim in (16, 32):
        sp = coord_model(64, False, head_dim=head_dim, depth=1, seq_len=16, n_kv_head=1)
        mup = coord_model(64, True, base_width=64, head_dim=head_dim, depth=1, seq_len=16, n_kv_head=1)
        mup.load_state_dict(sp.state_dict())
        for m in (sp, mup):
            torch.nn.init.normal_(m.lm_head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
            torch.nn.init.normal_(m.transformer.h[0].attn.c_proj.weight, generator=torch.Generator().manual_seed(1))
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(mup(x), sp(x), rtol=1e-6, atol=1e-6)  # scales agree to rounding


def test_width_through_head_dim():
    base = gpt(n_embd=64, n_head=2, n_kv_head=1, mup_base_width=64)
    wide = gpt(n_embd=256, n_head=2, n_kv_head=1, mup_base_width=64, mup_base_head_dim=32)
    assert wide.config.head_dim == 128 and wide.config.attn_mult == pytest.approx(math.sqrt(32))
    # 1/d: four times the head_dim, a quarter of the base's scale; SP would take half (1/sqrt(d))
    assert wide.config.attn_scale == pytest.approx(base.config.attn_scale / 4)
    s = wide.param_shapes()
    # kv dim = head_dim grows too; the value-embedding gate (12 channels -> 1 kv head) is fixed
    assert all(s[n]["cls"] == ("fixed" if "ve_gate" in n else "hidden") for n in s if s[n]["role"] == "matrix")
    b, w = rules(base), rules(wide)
    assert all(w[n]["update_scale"] == b[n]["update_scale"] for n in w if "update_scale" in w[n])


# ---------------------------------------------------------------------------------------------------
# 3. scalars and embedding


@pytest.mark.parametrize("base", [0, 32])
def test_scalar_lrs_follow_nanochat_and_embedding_eps_follows_its_gradient(base):
    model = gpt(n_embd=128, n_head=4, n_kv_head=4, mup_base_width=base)
    r = rules(model, scalar_lr=0.4, adam_eps=1e-8)
    assert r["resid_lambdas"]["lr"] == pytest.approx(0.004) and r["x0_lambdas"]["lr"] == 0.4
    m = 128 / base if base else 1.0
    assert r[EMB]["eps"] == pytest.approx(1e-8 / m) and r[HEAD]["eps"] == pytest.approx(1e-8 / m)
    assert r["resid_lambdas"]["eps"] == r["x0_lambdas"]["eps"] == 1e-8
    opt = model.setup_optimizer(scalar_lr=0.4)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lrs["resid_lambdas"] == pytest.approx(0.004) and lrs["x0_lambdas"] == 0.4


def test_embedding_gradient_shrinks_like_one_over_width():
    # the reason for the embedding's eps/m, measured: after one muP step
    norms = []
    for width in (64, 256):
        model = coord_model(width, True, base_width=64, depth=1, seq_len=16)
        opt = model.setup_optimizer()
        g = torch.Generator().manual_seed(1)
        x, y = (torch.randint(0, 256, (4, 16), generator=g) for _ in range(2))
        model(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        grad = model.transformer.wte.weight.grad
        norms.append(grad[grad.abs().sum(1) > 0].pow(2).mean().sqrt().item())
    assert math.log2(norms[1] / norms[0]) / 2 == pytest.approx(-1.0, abs=0.1)  # measured -1.00


# ---------------------------------------------------------------------------------------------------
# 5. weight decay and the per-matrix Muon step


@pytest.mark.parametrize("opt_name", ["muon", "adamw"])
def test_weight_decay_per_step_is_width_independent(opt_name):
    # a zero gradient leaves only the decay: each parameter shrinks by 1 - lr*wd, which must not depend on width
    factors = []
    for width in (64, 256):
        model = coord_model(width, True, base_width=64, depth=1, seq_len=16, n_kv_head=1)
        opt = model.setup_optimizer(matrix_optimizer=opt_name, weight_decay=0.5)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        w = model.transformer.h[0].attn
        before = {n: getattr(w, n).weight.detach().clone() for n in ("c_q", "c_k")}
        opt.step()
        factors.append({n: (getattr(w, n).weight / before[n]).mean().item() for n in before})
    for n in factors[0]:
        assert factors[0][n] < 1 - 1e-4 and factors[1][n] == pytest.approx(factors[0][n], abs=1e-6), n


def muon_spectral_slopes(widths=(64, 128, 256, 512), square_rule=False, rank=0, **hp):
    """Fitted log2 slope vs width of one Muon step's ||dW||_2 per matrix kind, and the spectral condition's
    slope of sqrt(fan_out/fan_in). `square_rule` puts back the old max(1, fo/fi)^0.5 at the model's own shape."""
    got, want = {}, {}
    for width in widths:
        model = coord_model(width, True, base_width=64, depth=1, seq_len=16, n_kv_head=1)
        opt = model.setup_optimizer(weight_decay=0.0, **hp)  # the update alone
        if square_rule:
            for g in opt.param_groups:
                if g["kind"] == "muon":
                    fo, fi = g["params"][0].shape
                    g["update_scale"] = max(1.0, fo / fi) ** 0.5
        for kind, v in muon_step_spectral(model, opt, rank=rank).items():
            got.setdefault(kind, []).append(math.log2(v))
        for name, s in model.param_shapes().items():
            if s["role"] == "matrix":
                want.setdefault(param_kind(name, "matrix"), {})[width] = 0.5 * math.log2(s["fan_out"] / s["fan_in"])
    lw = np.log2(widths)
    return {k: (np.polyfit(lw, got[k], 1)[0], np.polyfit(lw, [want[k][w] for w in widths], 1)[0]) for k in got}


@pytest.mark.parametrize("normuon_beta2", [0.9, 0.0])
def test_muon_step_spectral_norm_scales_like_sqrt_fan_out_over_fan_in(normuon_beta2):
    # with and without NorMuon: its per-row normalisation at a fixed Frobenius norm keeps muP's update scale
    slopes = muon_spectral_slopes(normuon_beta2=normuon_beta2)
    assert slopes["attn.c_k"][1] == pytest.approx(-0.5) and slopes["attn.c_q"][1] == pytest.approx(0.0)
    assert slopes["attn.ve_gate"][1] == pytest.approx(0.0)  # 12 channels -> 1 kv head at every width: fixed
    bad = {k: v for k, v in slopes.items() if abs(v[0] - v[1]) > 0.05}
    assert not bad, bad
    if normuon_beta2:
        return
    # the old square-matrix rule for c_k / c_v with fixed kv heads must fail this check
    old = muon_spectral_slopes(square_rule=True)
    assert {k for k, v in old.items() if abs(v[0] - v[1]) > 0.4} == {"attn.c_k", "attn.c_v"}


def test_muon_plus_renormalisation_breaks_the_spectral_condition_on_low_rank_gradients():
    # a rank-4 gradient: the polar factor has 4 unit singular values and the rest ~0, so snapping its Frobenius norm
    # to sqrt(min(rows, cols)) (Muon+, nanochat) multiplies it by sqrt(min / 4): ||dW||_2 grows like sqrt(width)
    # where the spectral condition wants it flat. Off by default (OptimConfig.muon_renorm) for this reason.
    on = muon_spectral_slopes(rank=4, muon_renorm=True)
    off = muon_spectral_slopes(rank=4)
    for kind in ("attn.c_q", "mlp.c_fc", "mlp.c_proj"):
        assert on[kind][0] - on[kind][1] > 0.4 and abs(off[kind][0] - off[kind][1]) < 0.05, (kind, on[kind], off[kind])


# ---------------------------------------------------------------------------------------------------
# 4. the base config travels with the run and is checked


def test_base_fields_resolved_recorded_and_checked():
    cfg = GPTConfig(n_layer=3, n_embd=256, n_head=8, n_kv_head=2, mup_base_width=64)
    assert (cfg.mup_base_head_dim, cfg.mup_base_n_kv_head, cfg.mup_base_n_layer) == (32, 2, 3)  # kv count fixed
    assert GPTConfig(**asdict(cfg)) == cfg  # what config.json / checkpoints store rebuilds the same model
    mha = GPTConfig(n_embd=256, n_head=8, n_kv_head=8, mup_base_width=64)
    assert mha.mup_base_n_kv_head == 2 and mha.mup_base().n_kv_head == 2  # an MHA model has an MHA base
    sp = GPTConfig(n_embd=256, n_head=8, n_kv_head=8)
    assert (sp.mup_base_head_dim, sp.mup_base_n_kv_head, sp.mup_base_n_layer, sp.attn_mult) == (0, 0, 0, 0.0)
    cases = [
        (dict(mup_base_n_layer=2), "n_layer=3 but the muP base has mup_base_n_layer=2"),
        (dict(mup_base_width=48), "mup_base_width=48 is not a multiple of the base head_dim 32"),
        (dict(mup_base_n_kv_head=3), "2 heads (width 64, head_dim 32) not divisible by 3 kv heads"),
        (dict(mup_base_width=0, mup_base_head_dim=16), "mup_base_head_dim=16 describes a muP base"),
        (dict(mup_base_n_layer=-1), "mup_base_n_layer=-1"),
    ]
    for kw, match in cases:
        args = {**dict(n_layer=3, n_embd=256, n_head=8, n_kv_head=8, mup_base_width=64), **kw}
        with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
            GPTConfig(**args)


def test_base_train_records_the_base_and_refuses_another_depth_without_the_depth_rule(corpus, tmp_path):
    tiny = ["--depth", "1", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "1", "--sequence-len", "16",
            "--device-batch-size", "2", "--eval-tokens", "64", "--device", "cpu", "--data-dir", corpus["data"],
            "--tokenizer-dir", corpus["tok"], "--num-iterations", "1", "--mup_base_width", "32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "base_train.py"), *tiny]
    bad = subprocess.run(cmd + ["--mup-base-depth", "2", "--out-dir", str(tmp_path / "bad")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.count("\n") == 1 and "mup_base_n_layer=2" in bad.stderr and "depth 1" in bad.stderr
    assert "--depth-alpha 1" in bad.stderr  # the fix
    # with the depth rule the same depth change is accepted (base depth 2, this model 1: m_L = 1/2)
    ok = subprocess.run(cmd + ["--mup-base-head-dim", "16", "--mup-base-depth", "2", "--depth_alpha", "1",
                               "--out-dir", str(tmp_path / "ok")], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    model_config = json.load(open(tmp_path / "ok" / "config.json"))["model_config"]
    assert {k: model_config[k] for k in ("mup_base_width", "mup_base_head_dim", "mup_base_n_kv_head",
                                         "mup_base_n_layer", "depth_alpha")} == dict(
        mup_base_width=32, mup_base_head_dim=16, mup_base_n_kv_head=1, mup_base_n_layer=2, depth_alpha=1.0)
    factors = json.load(open(tmp_path / "ok" / "config.json"))["depth_factors"]
    assert factors == dict(m_L=0.5, branch_mult=2.0, matrix_lr=1.0, scalar_lr=2.0)
    assert "depth rule alpha=1 (CompleteP Table 1): m_L=0.5, branch multiplier 2" in ok.stdout
    meta = json.load(open(tmp_path / "ok" / "checkpoints" / "step_000001" / "meta.json"))
    assert meta["model_config"] == model_config
    # c_k / c_v with one kv head at twice the base width: output-like in the printed table
    assert next(ln for ln in ok.stdout.splitlines() if ln.startswith(CK)).split()[2] == "output"
