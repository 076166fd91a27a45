"""
Compile the Triton kernels' CUDA launch configs for an H100 (sm_90) on a machine without a GPU, and report
what each one uses. Triton ships ptxas, so `triton.compile(..., target=GPUTarget("cuda", 90, 32))` runs on CPU.

    TRITON_INTERPRET=0 python scripts/compile_check.py          # markdown table
    TRITON_INTERPRET=0 python scripts/compile_check.py --json   # one JSON record per line (the test reads it)

Per compiled kernel: shared memory per block (compiler metadata), registers and stack frame from
`cuobjdump -res-usage` (these kernels call no functions, so any stack is register spills), and the
tensor-core instructions in the PTX. Tests assert the limits on this (tests/test_kernel_configs.py).

What is compiled. CAUSAL is a constexpr, so causal and non-causal are separate compilations; `window` is a
runtime int, so one causal compilation serves every window, None included. The JIT also specialises integer
arguments on divisibility by 16, which changes register allocation: "aligned" marks T and window divisible
(training shapes: T 2048, window 1024; also strides, width 768, vocab 32768), "odd" leaves T and window
unmarked (generation: T grows by one per token). Head counts, the GQA group and the head's vocab split count
are never marked.
- attention forward, dK/dV and dQ: every config the autotuner keeps for the dtype and head_dim (its own
  early_config_prune), for bf16 and fp32 at head_dim 32, 64 and 128, causal, aligned and odd; non-causal
  aligned at head_dim 128; fp16 causal aligned at head_dim 128 (fp16 and bf16 compile to the same resource
  use, which the test checks).
- the backward's delta kernel at head_dim 32, 64, 128 in bf16, fp16 and fp32 (aligned).
- the head's logits + log-sum-exp kernel for bf16, fp16 and fp32 inputs, and its dlogits kernel (fp32).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels would be defined for the interpreter
    sys.exit("compile_check.py: TRITON_INTERPRET=1: run it with TRITON_INTERPRET=0 (or unset)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention, head  # noqa: E402
from nanochat.common import ArgParser  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SMEM = 232_448  # bytes of shared memory one block may use (sm_90 opt-in maximum)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION = {"attn_fwd": attention._attn_fwd, "attn_bwd_dkdv": attention._attn_bwd_dkdv,
             "attn_bwd_dq": attention._attn_bwd_dq}
KERNELS = {**{name: tuner.fn for name, tuner in ATTENTION.items()}, "attn_bwd_delta": attention._bwd_delta,
           "head_logits_lse": head._logits_lse_kernel, "head_dlogits": head._dlogits_kernel}
ATTN_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # plus LSE and DELTA, fp32
FP32_POINTERS = {"LSE", "DELTA", "buf_ptr", "lse_ptr", "scale_ptr"}
FLOATS = {"scale", "qk_scale", "logit_mult", "softcap"}
NOT_DIVISIBLE = {"H", "group", "n_splits"}


def autotuned(name, dtype, head_dim):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of every config the autotuner would try."""
    tuner = ATTENTION[name]
    kept = tuner.early_config_prune(tuner.configs, {"Q": torch.empty(0, dtype=DTYPES[dtype])}, HEAD_DIM=head_dim)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def jobs():
    """(kernel, dtype, constexprs, compile options, aligned) of every compilation in the module docstring."""
    out = []
    for name in ATTENTION:
        cases = [(dt, d, True, aligned) for dt in ("bf16", "fp32") for d in (32, 64, 128) for aligned in (True, False)]
        cases += [("bf16", 128, False, True), ("fp32", 128, False, True), ("fp16", 128, True, True)]
        for dtype, d, causal, aligned in cases:
            for m, n, w, s in autotuned(name, dtype, d):
                consts = dict(HEAD_DIM=d, BLOCK_M=m, BLOCK_N=n, CAUSAL=causal, UPCAST=False,
                              PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                out.append((name, dtype, consts, dict(num_warps=w, num_stages=s), aligned))
    for dtype in DTYPES:
        for d in (32, 64, 128):  # launched with the default options
            out.append(("attn_bwd_delta", dtype, dict(HEAD_DIM=d, BLOCK_M=64), {}, True))
        cfg, launch = head._triton_cfg(768, DTYPES[dtype])
        out.append(("head_logits_lse", dtype, dict(cfg, UPCAST=False), launch, True))
    cfg, _ = head._triton_cfg(768, torch.float32)
    out.append(("head_dlogits", "fp32", dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"]), dict(num_warps=8), True))
    return out


def signature(name, dtype, aligned):
    sig, attrs = {}, {}
    for i, p in enumerate(KERNELS[name].params):
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n == "tgt_ptr":
            sig[n] = "*i64"
        elif n in FP32_POINTERS:
            sig[n] = "*fp32"
        elif n.endswith("_ptr") or (name.startswith("attn") and n in ATTN_POINTERS):
            sig[n] = "*" + dtype
        else:
            sig[n] = "fp32" if n in FLOATS else "i32"
        if sig[n] not in ("constexpr", "fp32") and n not in NOT_DIVISIBLE and (aligned or n not in ("T", "window")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(job):
    name, dtype, consts, options, aligned = job
    fn = KERNELS[name]
    sig, attrs = signature(name, dtype, aligned)
    t0 = time.time()
    compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET, options=options)
    seconds = time.time() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
    tensor_ops = sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", compiled.asm["ptx"])))
    return dict(kernel=name, dtype=dtype, head_dim=consts.get("HEAD_DIM"), causal=consts.get("CAUSAL"), aligned=aligned,
                config={k: v for k, v in consts.items() if k.startswith(("BLOCK", "TILES"))} | options,
                shared=compiled.metadata.shared, registers=int(res["REG"]), stack=int(res["STACK"]),
                tensor_ops=tensor_ops, seconds=round(seconds, 2))


def run(workers):
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        return list(pool.map(compile_one, jobs()))


def main():
    p = ArgParser(description="compile the Triton kernel configs for sm_90 and report resources")
    p.add("--json", action="store_true", help="one JSON record per line instead of a table")
    p.add("--workers", type=int, min=1, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    args = p.parse_args()
    t0 = time.time()
    rows = run(args.workers)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"sm_90, triton {triton.__version__}: {len(rows)} compilations in {time.time() - t0:.0f} s "
          f"({args.workers} workers); H100 shared memory limit {H100_SMEM:,} B per block\n")
    print("| kernel | dtype | D | causal | T, window | config | shared B | regs | stack B | tensor-core ops |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        ops = sorted({op.split(".")[0] + "." + ".".join(op.split(".")[-3:]) for op in r["tensor_ops"]})  # short
        ops = ", ".join(ops) or "-"
        causal = "-" if r["causal"] is None else r["causal"]
        print(f"| {r['kernel']} | {r['dtype']} | {r['head_dim'] or '-'} | {causal} | "
              f"{'aligned' if r['aligned'] else 'odd'} | {cfg} | "
              f"{r['shared']:,} | {r['registers']} | {r['stack']} | {ops} |")


if __name__ == "__main__":
    main()
