"""
Benchmark the Triton attention kernel against SDPA and flex_attention, forward and forward+backward, causal and with
a sliding window.

    python scripts/bench_attention.py    # CUDA: B=4 H=16 D=128 bf16, T 1024..8192, window none and T/4

Methods: triton (kernels/attention.py), sdpa (the model's SDPA path: is_causal, or an explicit mask for a window),
sdpa_flash and sdpa_cudnn (SDPA forced onto one backend; causal only, they take no mask), flex (flex_attention with a
block mask, compiled). Each row is written to OUT/bench_attention.md the moment it is measured, so a run cut short
keeps what it measured; the target checks and the plot (bench_attention.png) follow at the end. A method that fails
(out of memory, no such backend) gets its error in its row; past --deadline-s no new row is started.
flex_attention is compiled afresh for every (T, window) after resetting dynamo: one compiled callable for all of them
passes dynamo's recompile limit (8), after which flex runs eagerly and materialises the whole score matrix.
FLOPs count the attended (query, key) pairs: 4*B*H*D per pair forward (= 4*B*H*T^2*D * 0.5 for full causal),
backward 2.5x forward.
Without CUDA (scripts/gpu_check.sh's dry run): Triton's interpreter, SDPA's default backend, eager flex forward only
(it has no CPU backward), timed with perf_counter: plumbing, not performance.
"""

import datetime
import os
import statistics
import sys
import time
import warnings

import torch

from nanochat.common import ArgParser, atomic_write_text

CUDA = torch.cuda.is_available()


def visible_pairs(T, window):
    if window is None:
        return T * (T + 1) // 2
    return sum(min(i, window) + 1 for i in range(T))


def make_methods(T, window, scale):
    """{name: (fn, layout (B, T, H, D) or heads first (B, H, T, D), has a backward)} for one (T, window)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from kernels.attention import flash_attention
    from nanochat.gpt import attention

    def backend(b):
        def fn(q, k, v):
            with sdpa_kernel(b):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return fn

    if not CUDA:  # eager flex is the point there (plumbing): no need to be told it is slow
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    w = T if window is None else window
    block_mask = create_block_mask(lambda b, h, i, j: (j <= i) & (j >= i - w), B=None, H=None, Q_LEN=T, KV_LEN=T,
                                   device="cuda" if CUDA else "cpu")
    torch._dynamo.reset()  # a fresh compile for this (T, window): see the module docstring
    flex = torch.compile(flex_attention, dynamic=False) if CUDA else flex_attention
    methods = {
        "triton": (lambda q, k, v: flash_attention(q, k, v, scale=scale, window=window), False, True),
        "sdpa": (lambda q, k, v: attention(q, k, v, scale, window, "sdpa"), False, True),
    }
    if CUDA and window is None:
        methods["sdpa_flash"] = (backend(SDPBackend.FLASH_ATTENTION), True, True)
        methods["sdpa_cudnn"] = (backend(SDPBackend.CUDNN_ATTENTION), True, True)
    methods["flex"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale), True, CUDA)
    return methods


def timed_ms(fn, grad_to_none):
    """Median milliseconds of fn: triton.testing.do_bench on CUDA, else a few perf_counter calls after a warm-up."""
    if CUDA:
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(fn, heads_first, backward, B, T, H, D, dtype):
    """(forward ms, forward+backward ms or None) of fn on random inputs."""
    shape = (B, H, T, D) if heads_first else (B, T, H, D)
    device = "cuda" if CUDA else "cpu"
    q, k, v, do = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward and i < 3) for i in range(4))
    with torch.no_grad():
        fwd = timed_ms(lambda: fn(q, k, v), None)
    fwd_bwd = timed_ms(lambda: fn(q, k, v).backward(do), [q, k, v]) if backward else None
    return fwd, fwd_bwd


def write_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [(axes[0], "fwd_tflops", "forward"), (axes[1], "fwd_bwd_tflops", "forward+backward")]
    for ax, key, title in panels:
        for method, full in sorted({(r["method"], r["window"] is None) for r in rows}):
            pts = [r for r in rows if r["method"] == method and (r["window"] is None) == full and r.get(key)]
            ax.plot([r["T"] for r in pts], [r[key] for r in pts], marker="o",
                    label=f"{method} ({'causal' if full else 'window T/4'})")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="T", ylabel="TFLOP/s", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table_row(r):
    if "error" in r:
        return f"| {r['T']} | {r['window'] or '-'} | {r['method']} | {r['error']} | | | |"
    num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    return (f"| {r['T']} | {r['window'] or '-'} | {r['method']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.1f} | "
            f"{num(r['fwd_bwd_ms'], '.3f')} | {num(r['fwd_bwd_tflops'], '.1f')} |")


def target_lines(rows, seqlens):
    by_key = {(r["method"], r["T"], r["window"]): r for r in rows if "error" not in r}
    get = lambda method, T, window: by_key.get((method, T, window))  # noqa: E731
    lines = []
    r = get("triton", 4096, None)
    if r:
        lines.append(f"- fwd T=4096 causal >= 450 TFLOP/s: {r['fwd_tflops']:.0f} "
                     f"({'met' if r['fwd_tflops'] >= 450 else 'NOT met'})")
    for T in seqlens:
        t, s = get("triton", T, None), get("sdpa_flash", T, None)
        if t and s and t["fwd_bwd_ms"] and s["fwd_bwd_ms"]:
            ratio = s["fwd_bwd_ms"] / t["fwd_bwd_ms"]
            lines.append(f"- fwd+bwd T={T} speedup vs SDPA flash >= 1.1x: {ratio:.2f}x "
                         f"({'met' if ratio >= 1.1 else 'NOT met'})")
    full, win = get("triton", 8192, None), get("triton", 8192, 8192 // 4)
    if full and win and full["fwd_bwd_ms"] and win["fwd_bwd_ms"]:
        ratio = full["fwd_bwd_ms"] / win["fwd_bwd_ms"]
        lines.append(f"- window T/4 vs full causal at T=8192 (fwd+bwd) >= 2x: {ratio:.2f}x "
                     f"({'met' if ratio >= 2 else 'NOT met'})")
    return lines


def main():
    parser = ArgParser(description=__doc__.strip().splitlines()[0])
    parser.add("--batch", type=int, min=1, default=4)
    parser.add("--heads", type=int, min=1, default=16)
    parser.add("--head-dim", type=int, min=1, default=128)
    parser.add("--seqlens", type=int, min=1, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add("--out-dir", path="out", default="dev")
    parser.add("--deadline-s", type=float, above=0, default=None, help="start no new row after this many seconds")
    args = parser.parse_args()
    from kernels.attention_torch import unsupported

    if why := unsupported("cuda" if CUDA else "cpu", getattr(torch, args.dtype), args.head_dim):
        parser.error(f"the Triton kernel cannot run {why}: pick another --head-dim/--dtype, or run on CUDA "
                     "(or with TRITON_INTERPRET=1 on CPU)")
    t0 = time.time()
    B, H, D, dtype = args.batch, args.heads, args.head_dim, getattr(torch, args.dtype)
    device = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter; plumbing only)"
    head = [f"# Attention benchmark ({device}, {args.dtype}, B={B} H={H} D={D})", "",
            f"- command: `python scripts/bench_attention.py {' '.join(sys.argv[1:])}`",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}",
            "- times: medians (triton.testing.do_bench on CUDA); TFLOP/s over the attended pairs", "",
            "| T | window | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
            "|---|---|---|---|---|---|---|"]
    md = os.path.join(args.out_dir, "bench_attention.md")
    rows, skipped = [], []
    for T in args.seqlens:
        for window in (None, T // 4):
            if args.deadline_s is not None and time.time() - t0 > args.deadline_s:
                skipped.append(f"T={T} window={window}")
                continue
            flops = 4 * B * H * D * visible_pairs(T, window)
            for method, (fn, heads_first, backward) in make_methods(T, window, D**-0.5).items():
                row = dict(T=T, window=window, method=method)
                try:
                    fwd, fwd_bwd = bench(fn, heads_first, backward, B, T, H, D, dtype)
                    row.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_tflops=flops / fwd * 1e-9,
                               fwd_bwd_tflops=fwd_bwd and 3.5 * flops / fwd_bwd * 1e-9)
                except (RuntimeError, NotImplementedError) as e:  # out of memory, a backend that cannot run it
                    row["error"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
                    if CUDA:
                        torch.cuda.empty_cache()
                rows.append(row)
                print(table_row(row), flush=True)
                atomic_write_text(md, "\n".join(head + [table_row(r) for r in rows]) + "\n")
    targets = target_lines(rows, args.seqlens)
    tail = ["", "Targets (H100):", *targets] if CUDA else []
    tail += ["", f"Not measured (past --deadline-s {args.deadline_s:g} s): {', '.join(skipped)}"] if skipped else []
    atomic_write_text(md, "\n".join(head + [table_row(r) for r in rows] + tail) + "\n")
    if any("error" not in r for r in rows):
        write_plot([r for r in rows if "error" not in r], os.path.join(args.out_dir, "bench_attention.png"))
    print("\n".join(targets))
    print(f"wrote {md}")


if __name__ == "__main__":
    sys.exit(main())
