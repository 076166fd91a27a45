"""nanochat/kernel_choice.py, base_train's checked choice of the Triton kernels, through Triton's interpreter on CPU
(the compiled kernels on a GPU). `auto` refuses an injected wrong kernel (output or gradient) and an injected slow
one, and takes a correct one that times faster, which the model then runs; `triton` keeps the kernel and still
reports; `sdpa` / `chunked` skip the check. Also the static `auto` rule outside base_train (fp32 stays on PyTorch)."""

import time

import pytest
import torch
from conftest import DEVICE, torchrun

import kernels.attention
import kernels.head
from kernels import attention_torch, head_torch
from nanochat import kernel_choice
from nanochat.gpt import GPTConfig, build_model

# GQA 4:2, a sliding-window layer then a full one (two attention cases), muP logit multiplier, softcap
CFG = dict(sequence_len=48, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SL",
           short_window=24, mup_base_width=64, softcap=15.0)


class ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient x1.05 backward: a kernel whose output is right and whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.05


def choose(attn_impl="auto", head_impl="auto", dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = build_model(GPTConfig(**CFG, attn_impl=attn_impl, head_impl=head_impl), DEVICE)
    lines = []
    record = kernel_choice.choose_kernels(model, 2, dtype, lines.append)
    return model, record, lines


@pytest.fixture
def checked(monkeypatch):
    """`auto` checks on this device too (on CPU it otherwise takes PyTorch without looking: the interpreter is for
    tests)."""
    monkeypatch.setattr(kernel_choice, "CHECKED", {"cpu", "cuda"})


@pytest.fixture
def fast(monkeypatch):
    """The kernels time faster than PyTorch (the interpreter never would), so only correctness decides."""
    monkeypatch.setattr(kernel_choice, "time_pair", lambda kernel, other, device: (1e-3, 2e-3))


def test_auto_takes_a_correct_faster_kernel_and_the_model_runs_it(checked, fast, monkeypatch):
    model, record, lines = choose()
    assert [r["impl"] for r in record["attention"]] == ["triton", "triton"]
    assert [r["window"] for r in record["attention"]] == [CFG["sequence_len"] // 2, None]
    assert record["head"]["impl"] == "triton" and record["head"]["correct"]
    assert all(r["reason"] == "correct and not slower" and r["ms"] == [1.0, 2.0] for r in record["attention"])
    assert len(lines) == 3 and all("triton 1.000 ms vs" in line and "-> triton" in line for line in lines), lines
    # the choice is on the modules: the model now runs both kernels (it would run SDPA/chunked on CPU under auto)
    calls = []
    for mod, name in ((kernels.attention, "flash_attention"), (kernels.head, "fused_linear_cross_entropy")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    x = torch.randint(0, 97, (2, 48), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert torch.isfinite(model(x, x))
    assert calls == ["flash_attention", "flash_attention", "fused_linear_cross_entropy"]


@pytest.mark.parametrize("wrong", ["output", "gradient"])
def test_auto_refuses_a_wrong_attention_kernel(checked, fast, monkeypatch, wrong):
    real = kernels.attention.flash_attention
    if wrong == "output":
        bad = lambda q, k, v, **kw: real(q, k, v, **kw) * 1.02  # noqa: E731
    else:
        bad = lambda q, k, v, **kw: real(q, ScaleGrad.apply(k), v, **kw)  # noqa: E731
    monkeypatch.setattr(kernels.attention, "flash_attention", bad)
    _, record, lines = choose()
    for r in record["attention"]:
        assert r["impl"] == "sdpa" and r["reason"] == "incorrect" and not r["correct"], r
        errs = r["errors"]["o" if wrong == "output" else "dk"]
        assert errs[0] > 2 * errs[1] + 1e-5, errs
    assert record["head"]["impl"] == "triton"  # only the broken kernel is refused
    assert sum("INCORRECT" in line and "-> sdpa (incorrect)" in line for line in lines) == 2, lines


def test_auto_refuses_a_wrong_head_kernel(checked, fast, monkeypatch):
    real = kernels.head.fused_linear_cross_entropy
    monkeypatch.setattr(kernels.head, "fused_linear_cross_entropy",
                        lambda x, w, t, **kw: real(x, ScaleGrad.apply(w), t, **kw))
    _, record, _ = choose()
    head = record["head"]
    assert head["impl"] == "chunked" and head["reason"] == "incorrect", head
    assert head["errors"]["grad_W"][0] > 2 * head["errors"]["grad_W"][1] + 1e-5
    assert [r["impl"] for r in record["attention"]] == ["triton", "triton"]


def test_auto_refuses_a_slow_kernel(checked, monkeypatch):
    # correct but slow (50 ms of waiting per call): timed for real, it loses to PyTorch
    for mod, name in ((kernels.attention, "flash_attention"), (kernels.head, "fused_linear_cross_entropy")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, **kw: time.sleep(0.05) or real(*a, **kw))
    _, record, lines = choose()
    for r in record["attention"] + [record["head"]]:
        assert r["impl"] in ("sdpa", "chunked") and r["correct"] and r["reason"] == "slower", r
        assert r["ms"][0] > r["ms"][1] and r["ms"][0] >= 50, r["ms"]
    assert all("-> sdpa (slower)" in line or "-> chunked (slower)" in line for line in lines), lines


def test_forced_triton_keeps_the_kernel_and_still_reports(checked, fast, monkeypatch):
    real = kernels.attention.flash_attention
    monkeypatch.setattr(kernels.attention, "flash_attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.02)
    model, record, lines = choose("triton", "triton")
    assert all(r["impl"] == "triton" and r["reason"] == "forced by triton" for r in record["attention"])
    assert not record["attention"][0]["correct"] and record["head"]["correct"]
    assert all(block.attn.attn_impl == "triton" for block in model.transformer.h) and model.head_impl == "triton"
    assert "INCORRECT" in lines[0] and "-> triton (forced by triton)" in lines[0], lines


def test_sdpa_and_chunked_skip_the_check(checked, fast, monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("checked")

    monkeypatch.setattr(kernel_choice, "check_attention", fail)
    monkeypatch.setattr(kernel_choice, "check_head", fail)
    model, record, lines = choose("sdpa", "chunked")
    assert [r["impl"] for r in record["attention"]] == ["sdpa", "sdpa"] and record["head"]["impl"] == "chunked"
    assert all("requested: no check" in line for line in lines)
    assert model.head_impl == "chunked"


def test_auto_off_the_checked_devices_takes_pytorch_without_checking(monkeypatch):
    monkeypatch.setattr(kernel_choice, "CHECKED", set())
    monkeypatch.setattr(kernel_choice, "check_attention", None)  # would raise if called
    _, record, lines = choose()
    assert [r["impl"] for r in record["attention"]] == ["sdpa", "sdpa"] and record["head"]["impl"] == "chunked"
    assert all("where the kernels run only in tests" in line for line in lines), lines


def test_static_auto_leaves_float32_to_pytorch():
    # outside base_train `auto` decides per forward: the kernels only for bf16/fp16 (the fp32 tiles are small);
    # `triton` still runs fp32, and base_train's check times it
    for dtype in (torch.bfloat16, torch.float16):
        assert attention_torch.unsupported(DEVICE, dtype, 64, auto=True) is None
        assert head_torch.unsupported(DEVICE, dtype, auto=True) is None
    assert "float32 under auto" in attention_torch.unsupported("cuda", torch.float32, 64, auto=True)
    assert "float32 under auto" in head_torch.unsupported("cuda", torch.float32, auto=True)
    assert attention_torch.unsupported(DEVICE, torch.float32, 64) is None
    assert head_torch.unsupported(DEVICE, torch.float32) is None


AGREE = '''
import os
import sys

import torch.distributed as dist
from nanochat.gpt import GPTConfig, build_model
from nanochat.kernel_choice import agree_across_ranks
dist.init_process_group("gloo")
rank = dist.get_rank()
model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                              window_pattern="SL", short_window=8), "cpu")
# rank 0 found the kernel faster for the windowed layer, rank 1 did not; both took it for the full layer and the head
mine = ["triton" if rank == 0 else "sdpa", "triton"]
record = dict(attention=[dict(layers=[i], impl=impl, reason="r") for i, impl in enumerate(mine)],
              head=dict(impl="triton", reason="r"))
agree_across_ranks(model, record, log=lambda *a: None)
dist.destroy_process_group()
with open(sys.argv[1] + f"/rank{rank}.txt", "w") as f:
    f.write(f"{[b.attn.attn_impl for b in model.transformer.h]} {model.head_impl}")
os._exit(0)
'''


def test_ranks_agree_on_the_slowest_choice(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    r = torchrun(script, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert got == ["['sdpa', 'triton'] triton"] * 2
