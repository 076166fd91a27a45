"""The batch and horizon rules (nanochat/scaling.py): exact at their reference, nanochat's formulas where they
should be, applied by base_train exactly as hand-scaled values, and the transfer fits that measure them."""

import json
import math

import numpy as np
import pytest
from conftest import metrics, train

from nanochat.gpt import GPTConfig, build_model
from nanochat.scaling import POWER_LINES_EXP, auto_batch, factors, horizon
from nanochat.transfer import summarize


@pytest.mark.parametrize("ref_batch, ref_tokens", [(512, 61_440), (2**19, 10**9), (3000, 7777)])
@pytest.mark.parametrize("exponent, wd_rule", [(0.5, True), (1.0, True), (0.0, False), (0.25, True)])
def test_every_factor_is_exactly_one_at_the_reference(ref_batch, ref_tokens, exponent, wd_rule):
    assert factors(ref_batch, ref_tokens, ref_batch, ref_tokens, exponent, wd_rule) == dict(lr=1.0, wd=1.0)


def test_the_weight_decay_rule_holds_the_timescale_and_is_nanochats_with_the_square_root_rule():
    ref_b, ref_d, eta, lam = 4096, 2**21, 0.02, 0.28
    rng = np.random.default_rng(0)
    for B, D, e in zip(2.0 ** rng.integers(8, 20, 20), 2.0 ** rng.uniform(18, 32, 20), rng.uniform(0, 1, 20)):
        f = factors(B, D, ref_b, ref_d, e)
        assert f["lr"] == pytest.approx((B / ref_b) ** e)
        # decoupled decay's timescale as a share of the run, B / (eta lambda D), is the reference's
        assert B / (eta * f["lr"] * lam * f["wd"] * D) == pytest.approx(ref_b / (eta * lam * ref_d))
        nanochat = factors(B, D, ref_b, ref_d, 0.5)
        assert nanochat["wd"] == pytest.approx(math.sqrt(B / ref_b) * ref_d / D)  # nanochat base_train's formula
    assert factors(2 * ref_b, 4 * ref_d, ref_b, ref_d, 0.5, wd_rule=False) == dict(lr=pytest.approx(2 ** 0.5), wd=1.0)
    assert factors(2 * ref_b, ref_d, ref_b, ref_d, 0.0)["lr"] == 1.0  # the LR rule off


def test_auto_batch_follows_power_lines_to_the_nearest_power_of_two():
    assert auto_batch(10**9, 2**19, 10**9) == 2**19
    for k in (-3, -1, 1, 4):  # D x 2^(k / 0.383) -> B x 2^k
        assert auto_batch(10**9 * 2 ** (k / POWER_LINES_EXP), 2**19, 10**9) == 2 ** (19 + k)
    assert auto_batch(2 * 10**9, 2**19, 10**9) == 2**19  # 2^0.383 = 1.3x rounds back to the reference


def test_horizon_from_each_budget_and_one_at_a_time():
    assert horizon(target_tokens=12345) == 12345
    assert horizon(ratio=12, scaling_params=1000) == 12000
    assert horizon(flops=6e9, flops_per_token=3e3) == 2_000_000
    assert horizon() == 0  # none: base_train trains --num-iterations
    with pytest.raises(ValueError, match="--target-tokens and --target-flops both set the horizon"):
        horizon(target_tokens=1, flops=1.0, flops_per_token=1)


def test_scaling_params_are_the_blocks_matrices_and_lm_head():
    cfg = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
    model = build_model(cfg, "meta")
    d, kv = 128, 2 * 32
    blocks = 2 * (d * d + 2 * d * kv + d * d + 2 * 4 * d * d)  # q, k and v (GQA), proj, MLP
    gates = sum(p.numel() for n, p in model.named_parameters() if "ve_gate" in n)
    assert gates > 0 and model.num_scaling_params() == blocks + gates + cfg.padded_vocab * d


def test_base_train_applies_the_rules_exactly_as_hand_scaled_values(corpus, tmp_path):
    # batch 256 = 4 x the reference's 64 at the same tokens: every LR x 4^0.5 = 2, weight decay x 4 / 2 = 2
    shape = ["--total-batch-size", "256", "--target-tokens", "1024", "--eval-every", "0"]
    train(corpus, tmp_path / "rules", *shape, "--ref-batch-size", "64", "--ref-tokens", "1024")
    train(corpus, tmp_path / "hand", *shape, "--matrix-lr", "0.04", "--embedding-lr", "0.6", "--unembedding-lr",
          "0.016", "--scalar-lr", "1.0", "--gate-lr", "0.4", "--weight-decay", "0.56")
    rules, hand = metrics(tmp_path / "rules"), metrics(tmp_path / "hand")
    assert len(rules) == 4 and [r["train_loss"] for r in rules] == [r["train_loss"] for r in hand]
    cfg = json.load(open(tmp_path / "rules" / "config.json"))["scaling"]
    assert (cfg["lr_factor"], cfg["wd_factor"], cfg["tokens"], cfg["batch"]) == (2.0, 2.0, 1024, 256)
    assert json.load(open(tmp_path / "hand" / "config.json"))["scaling"]["lr_factor"] == 1.0  # no reference
    off = train(corpus, tmp_path / "off", *shape, "--ref-batch-size", "64", "--ref-tokens", "1024",
                "--batch-lr-scaling", "0", "--wd-scaling", "0")
    assert "every LR x 1: batch LR rule off" in off.stdout
    assert [r["train_loss"] for r in metrics(tmp_path / "off")] != [r["train_loss"] for r in rules]


def test_base_train_auto_batch_and_horizon_from_a_param_data_ratio(corpus, tmp_path):
    # from a reference of 128 tokens per step at 512 tokens, 512 x 2^(1 / 0.383) tokens call for 256 per step
    r = train(corpus, tmp_path / "auto", "--total-batch-size", "auto", "--target-tokens",
              str(round(512 * 2 ** (1 / POWER_LINES_EXP))), "--ref-batch-size", "128", "--ref-tokens", "512",
              "--eval-every", "0")
    s = json.load(open(tmp_path / "auto" / "config.json"))["scaling"]
    assert s["batch"] == 256 and "auto batch 256" in r.stdout and s["lr_factor"] == pytest.approx(2 ** 0.5)
    r = train(corpus, tmp_path / "ratio", "--target-param-data-ratio", "0.02", "--total-batch-size", "128",
              "--eval-every", "0")
    s = json.load(open(tmp_path / "ratio" / "config.json"))["scaling"]
    assert s["tokens"] == math.ceil(0.02 * s["scaling_params"] / 128) * 128
    assert len(metrics(tmp_path / "ratio")) == s["tokens"] // 128


@pytest.mark.parametrize("args, message", [
    (["--total-batch-size", "many"], "--total-batch-size=many: pass a number of tokens"),
    (["--total-batch-size", "auto"], "--total-batch-size=auto needs a horizon in tokens"),
    (["--target-tokens", "512", "--target-flops", "1e9"], "--target-tokens and --target-flops both set the horizon"),
    (["--ref-tokens", "512"], "--ref-tokens without --ref-batch-size"),
])
def test_bad_batch_and_horizon_options_give_one_line_errors(corpus, tmp_path, args, message):
    r = train(corpus, tmp_path / "bad", *args, check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("axis, other, k", [("batch", "tokens", 0.5), ("tokens", "batch", -0.3)])
def test_fit_recovers_known_slopes_along_batch_and_tokens(axis, other, k):
    # loss = (x - k log2(v / v0))^2 + noise along the axis, at two widths and one value of the other axis; width is
    # an axis of its own here, so each width is a group
    rng = np.random.default_rng(1)
    rows = [dict(mode="mup", depth=2, width=w, seed=s, x=x, **{axis: v, other: 4096},
                 val_bpb=(x - k * math.log2(v / 512)) ** 2 + 0.01 * rng.normal())
            for w in (64, 128) for v in (256, 512, 1024, 2048) for s in range(3) for x in (-2, -1, 0, 1, 2)]
    s = summarize(rows, "val_bpb", n_boot=200, axis=axis)
    assert sorted(s) == [("mup", 2, 64), ("mup", 2, 128)]
    for g in s.values():
        assert g["axis"] == axis and g["fixed"] == {"width": g["fixed"]["width"]} and g["values"] == [256, 512, 1024,
                                                                                                      2048]
        assert g["slope"] == pytest.approx(k, abs=0.05)
        lo, hi = g["slope_ci"]
        assert lo <= k <= hi and hi - lo < 0.3 and not lo <= 0 <= hi  # told from no drift
