"""
Time and peak memory of the output head (lm_head matmul + logit multiplier + softcap + cross-entropy),
forward + backward, for each implementation. Writes dev/bench_head_<device>.md.

Time on CPU: all cases in one process, interleaved round by round (a shared machine's load then hits all
alike). CUDA: one case after the other, each row written the moment it is measured. Peak memory on CPU: each case
runs one forward+backward in a fresh subprocess; its RSS high-water mark minus that of a subprocess that only
allocates the inputs. CUDA: torch.cuda.max_memory_allocated above the inputs during one forward+backward after a
warmup. F.linear_cross_entropy (torch 2.13+) is left out where torch lacks it; the triton case runs on CPU only
under TRITON_INTERPRET=1 (plumbing, for scripts/gpu_check.sh's dry run).

    python scripts/bench_head.py                       # CPU fp32 N=8192 d=512 V=32768
    python scripts/bench_head.py --device cuda         # bf16 N=16384 d=1024 V=65536
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kernels.head_torch import chunked_linear_cross_entropy, eager_linear_cross_entropy
from nanochat.common import ArgParser, atomic_write_text

CASES = ["eager", "compile", "F.linear_cross_entropy", "chunked", "triton"]
HAS_LCE = hasattr(F, "linear_cross_entropy")  # torch 2.13+
DTYPES = ["float32", "bfloat16", "float16"]


def parse_args():
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add("--device", default="cpu", choices=["cpu", "cuda"])
    p.add("--dtype", default=None, choices=DTYPES, help="default: float32 on cpu, bfloat16 on cuda")
    p.add("--N", type=int, min=1, default=None, help="tokens (default 8192 cpu, 16384 cuda)")
    p.add("--d", type=int, min=1, default=None, help="model width (default 512 cpu, 1024 cuda)")
    p.add("--V", type=int, min=1, default=None, help="vocab (default 32768 cpu, 65536 cuda)")
    p.add("--logit-mult", type=float, above=0, default=0.25)
    p.add("--softcap", type=float, min=0, default=15.0)
    p.add("--chunk-size", type=int, min=0, default=0, help="rows per chunk, 0 = automatic")
    p.add("--warmup", type=int, min=0, default=1)
    p.add("--iters", type=int, min=1, default=None, help="timed iterations (default 3 cpu, 20 cuda)")
    p.add("--cases", nargs="+", default=None, choices=CASES, help="default: all (no triton on cpu)")
    p.add("--out", path="outfile", default=None, help="markdown path (default dev/bench_head_<device>.md)")
    p.add("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one case, print json
    a = p.parse_args()
    cpu = a.device == "cpu"
    a.dtype = a.dtype or ("float32" if cpu else "bfloat16")
    a.N = a.N or (8192 if cpu else 16384)
    a.d = a.d or (512 if cpu else 1024)
    a.V = a.V or (32768 if cpu else 65536)
    a.iters = a.iters or (3 if cpu else 20)
    a.cases = a.cases or [c for c in CASES if (c != "triton" or not cpu) and (c != "F.linear_cross_entropy" or HAS_LCE)]
    if "F.linear_cross_entropy" in a.cases and not HAS_LCE:
        p.error(f"--cases=F.linear_cross_entropy: torch {torch.__version__} has none (2.13+): drop it from --cases")
    return a


def make_step(case, a):
    kw = dict(logit_mult=a.logit_mult, softcap=a.softcap)
    if case == "eager":
        return lambda x, w, t: eager_linear_cross_entropy(x, w, t, **kw)
    if case == "compile":
        f = torch.compile(eager_linear_cross_entropy, fullgraph=True)
        return lambda x, w, t: f(x, w, t, **kw)
    if case == "F.linear_cross_entropy":  # no softcap support: multiplier folded into x, softcap 0
        return lambda x, w, t: F.linear_cross_entropy(x * a.logit_mult, w, t)
    impl = chunked_linear_cross_entropy
    if case == "triton":
        from kernels.head import fused_linear_cross_entropy as impl  # only this case needs Triton
    return lambda x, w, t: impl(x, w, t, chunk_size=a.chunk_size, **kw)


def sync(a):
    if a.device == "cuda":
        torch.cuda.synchronize()


def make_inputs(a):
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    x = torch.randn(a.N, a.d, device=a.device, dtype=dtype, requires_grad=True)
    w = (torch.randn(a.V, a.d, device=a.device, dtype=dtype) / a.d**0.5).requires_grad_()
    t = torch.randint(0, a.V, (a.N,), device=a.device)
    return x, w, t


def fwd_bwd(step, x, w, t, a):
    x.grad = w.grad = None
    sync(a)
    t0 = time.perf_counter()
    step(x, w, t).backward()
    sync(a)
    return time.perf_counter() - t0


def time_cases(a, cases=None):
    """Median fwd+bwd time per case (default: all), with the cases interleaved round by round so that load changes
    on a shared machine hit all of them alike."""
    cases = cases or a.cases
    x, w, t = make_inputs(a)
    steps = {case: make_step(case, a) for case in cases}
    times = {case: [] for case in cases}
    for i in range(a.warmup + a.iters):
        for case, step in steps.items():
            dt = fwd_bwd(step, x, w, t, a)
            if i >= a.warmup:
                times[case].append(dt)
    return {case: 1e3 * statistics.median(ts) for case, ts in times.items()}


def peak_mib_cuda(case, a):
    x, w, t = make_inputs(a)
    step = make_step(case, a)
    fwd_bwd(step, x, w, t, a)  # warmup / compile
    x.grad = w.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(step, x, w, t, a)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def worker(a):
    """Fresh process: inputs, then (unless case 'inputs') one fwd+bwd; prints the RSS high-water mark."""
    x, w, t = make_inputs(a)
    if a.worker != "inputs":
        fwd_bwd(make_step(a.worker, a), x, w, t, a)
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}))  # KiB


def peak_mib_cpu(case, a):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", case]
    for k in ("device", "dtype", "N", "d", "V", "logit_mult", "softcap", "chunk_size"):
        argv += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_mib"]


def device_name(a):
    if a.device == "cuda":
        return torch.cuda.get_device_name()
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def main():
    a = parse_args()
    if a.worker:
        return worker(a)
    rows = {}
    if a.device == "cpu":  # each case in a fresh process so RSS high-water marks don't mix
        base = peak_mib_cpu("inputs", a)
        mem = {case: peak_mib_cpu(case, a) - base for case in a.cases}
        print("peak MiB:", {case: round(m, 1) for case, m in mem.items()}, flush=True)
        times = time_cases(a)
        rows = {case: (times[case], mem[case]) for case in a.cases}
    for case in a.cases if a.device == "cuda" else []:  # a row at a time, written as it is measured
        mib = peak_mib_cuda(case, a)
        rows[case] = (time_cases(a, [case])[case], mib)
        write_markdown(a, rows)
    for case, (ms, mib) in rows.items():
        print(f"{case:24s} {ms:9.1f} ms {mib:9.1f} MiB")
    write_markdown(a, rows)
    print(f"wrote {a.out or 'dev/bench_head_' + a.device + '.md'}")


def write_markdown(a, rows):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = a.out or os.path.join(root, "dev", f"bench_head_{a.device}.md")
    e_time, e_mem = rows.get("eager", (float("nan"), float("nan")))
    cpu = a.device == "cpu"
    mem_kind = "RSS high-water mark minus an inputs-only process" if cpu else "max_memory_allocated"
    lines = [
        f"# Output head benchmark ({a.device})",
        "",
        f"- command: `python scripts/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}`",
        f"- device: {device_name(a)}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- shape: N={a.N} d={a.d} V={a.V} {a.dtype}, logit_mult={a.logit_mult} softcap={a.softcap}, "
        f"chunk_size={a.chunk_size or 'auto'}; forward+backward, median of {a.iters} after {a.warmup} "
        "warmup, " + ("cases interleaved round by round in one process" if cpu else "one case after the other"),
        f"- peak memory: {mem_kind}; F.linear_cross_entropy has no softcap (runs with softcap 0)",
        "",
        "| case | time (ms) | peak mem (MiB) | time / eager | mem / eager |",
        "|---|---:|---:|---:|---:|",
    ]
    for case, (ms, mib) in rows.items():
        lines.append(f"| {case} | {ms:.1f} | {mib:.1f} | {ms / e_time:.2f} | {mib / e_mem:.3f} |")
    atomic_write_text(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
