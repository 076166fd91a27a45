"""CUDA launch configs, checked without a GPU.

Every config the attention autotuner can pick, and the head kernels' configs, compile for an H100 (sm_90)
within its shared memory, with no register spills (budget: 0 bytes of stack), onto tensor cores; for T and
window multiples of 16 and not (the JIT compiles those separately). The compile runs in a subprocess
(scripts/compile_check.py, which lists what it compiles): this process imported the kernels in interpreter mode.
Also: the attention autotune key buckets T, so generation does not re-tune for every new length.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from conftest import DEVICE, ROOT

import kernels.attention as attention
from kernels.attention import flash_attention
from kernels.attention_torch import attention_reference

H100_SMEM = 232_448
TABLES = {"attn_fwd": attention._FWD_CONFIGS, "attn_bwd_dkdv": attention._DKDV_CONFIGS,
          "attn_bwd_dq": attention._DQ_CONFIGS}
SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}


@pytest.fixture(scope="module")
def compiled():
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "compile_check.py"), "--json"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def _name(r):
    return f"{r['kernel']} {r['dtype']} D={r['head_dim']} causal={r['causal']} aligned={r['aligned']} {r['config']}"


def _tuple(config):
    return (config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], config["num_stages"])


def test_every_listed_config_is_compiled(compiled):
    # the subprocess takes its configs from each autotuner's own early_config_prune: they must be exactly the
    # table's entries for that dtype and head_dim, for every dtype and head_dim the kernels accept
    for kernel, table in TABLES.items():
        for dtype in ("bf16", "fp32"):
            for d in (32, 64, 128):
                for aligned in (True, False):  # T and window multiples of 16 (training) or not (generation)
                    got = {_tuple(r["config"]) for r in compiled
                           if (r["kernel"], r["dtype"], r["head_dim"], r["causal"], r["aligned"])
                           == (kernel, dtype, d, True, aligned)}
                    assert got and got == set(table[SIZES[dtype], d]), (kernel, dtype, d, aligned, got)
    kinds = {r["kernel"] for r in compiled}
    assert kinds == {*TABLES, "attn_bwd_delta", "head_logits_lse", "head_dlogits"}, kinds


def test_shared_memory_fits_h100(compiled):
    over = [f"{_name(r)}: {r['shared']:,} B" for r in compiled if r["shared"] > H100_SMEM]
    assert not over, over


def test_no_register_spills(compiled):
    spilled = [f"{_name(r)}: {r['stack']} B stack, {r['registers']} registers" for r in compiled if r["stack"] > 0]
    assert not spilled, spilled


def test_matmuls_run_on_tensor_cores(compiled):
    # bf16/fp16: Hopper wgmma. fp32 (tf32x3): tf32 wgmma, or tf32 mma.sync for tiles under 64 rows
    want = {"bf16": ("wgmma", ".bf16"), "fp16": ("wgmma", ".f16"), "fp32": ("mma", ".tf32")}
    for r in compiled:
        if r["kernel"] in ("attn_bwd_delta", "head_dlogits"):  # elementwise, no matmul
            continue
        op, dt = want[r["dtype"]]
        assert any(op in x and dt in x for x in r["tensor_ops"]), f"{_name(r)}: {r['tensor_ops']}"


def test_fp32_head_dim_128_attention_can_launch(compiled):
    # every fp32 tile at D=128 used to overflow shared memory: what the autotuner tries now all fits
    for kernel in TABLES:
        rows = [r for r in compiled if (r["kernel"], r["dtype"], r["head_dim"]) == (kernel, "fp32", 128)]
        assert rows and all(r["shared"] <= H100_SMEM and r["stack"] == 0 for r in rows), kernel


def test_fp16_compiles_like_bf16(compiled):
    # only bf16 is compiled at every head_dim: that is valid because fp16 uses the same resources
    key = lambda r: (r["kernel"], r["head_dim"], r["causal"], r["aligned"], json.dumps(r["config"]))
    bf16 = {key(r): r for r in compiled if r["dtype"] == "bf16"}
    fp16 = [r for r in compiled if r["dtype"] == "fp16" and r["kernel"] in TABLES]
    assert fp16
    for r in fp16:
        b = bf16[key(r)]
        assert (r["shared"], r["registers"], r["stack"]) == (b["shared"], b["registers"], b["stack"]), _name(r)


def test_unsupported_dtype_is_a_one_line_error():
    with pytest.raises(ValueError, match="torch.float64 at head_dim 64.*attn_impl='sdpa'"):
        attention._listed(attention._FWD_CONFIGS, torch.float64, 64)


# -----------------------------------------------------------------------------
# Autotune key: T bucketed to the next power of two


def test_t_bucket():
    assert {attention._t_bucket(T) for T in range(129, 257)} == {256}
    assert {attention._t_bucket(T) for T in range(1, 17)} == {16}
    assert attention._t_bucket(257) == 512
    assert "T_BUCKET" in attention._KEY and "T" not in attention._KEY


def test_generation_lengths_tune_once_per_bucket(monkeypatch):
    # Triton's own autotuner over two configs with the module's key; the benchmark is replaced by a fixed
    # timing (it needs a GPU), so this counts tuning runs while the kernel itself still runs
    tuned = []

    def bench(*args, config, **kwargs):
        tuned.append(kwargs["T_BUCKET"])
        return float(config.kwargs["BLOCK_M"])

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 32}, num_warps=4, num_stages=1) for m in (32, 64)]
    tuner = triton.autotune(configs, key=attention._KEY)(attention._attn_fwd.fn)
    monkeypatch.setattr(tuner, "_bench", bench)
    monkeypatch.setattr(attention, "_attn_fwd", tuner)
    g = torch.Generator().manual_seed(0)
    for T in (129, 200, 256, 257):
        q, k, v = (torch.randn(1, T, 1, 32, generator=g).to(DEVICE) for _ in range(3))
        o = flash_attention(q, k, v, scale=0.2)
        ref = attention_reference(q.double(), k.double(), v.double(), scale=0.2)
        assert (o.double() - ref).abs().max() < 1e-5, T
    assert tuned == [256, 256, 512, 512]  # one tuning (two configs) per bucket, not per length
    assert len(tuner.cache) == 2
