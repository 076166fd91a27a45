"""
Benchmark the Triton attention kernel against SDPA (flash backend) and compiled flex_attention.

    python scripts/bench_attention.py    # B=4 H=16 D=128 bf16, causal, T 512..8192, window none and T/4

Writes dev/bench_attention.md (table + target checks) and dev/bench_attention.png. Needs a CUDA GPU.
FLOPs count the attended (query, key) pairs: 4*B*H*D per pair forward (= 4*B*H*T^2*D * 0.5 for full
causal), backward 2.5x forward.
"""

import os
import sys

import torch

from nanochat.common import ArgParser


def visible_pairs(T, window):
    if window is None:
        return T * (T + 1) // 2
    return sum(min(i, window) + 1 for i in range(T))


def make_methods(T, window, flex_attention, create_block_mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import flash_attention

    def triton_attn(q, k, v):  # (B, T, H, D)
        return flash_attention(q, k, v, scale=q.size(-1) ** -0.5, window=window)

    def sdpa_flash(q, k, v):  # (B, H, T, D)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    w = T if window is None else window
    mask_mod = lambda b, h, i, j: (j <= i) & (j >= i - w)
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T)

    def flex(q, k, v):  # (B, H, T, D)
        return flex_attention(q, k, v, block_mask=block_mask)

    methods = {"triton": (triton_attn, False), "flex": (flex, True)}
    if window is None:  # the flash backend takes no mask, so no sliding window
        methods["sdpa_flash"] = (sdpa_flash, True)
    return methods


def bench(fn, heads_first, B, T, H, D, dtype):
    from triton.testing import do_bench

    shape = (B, H, T, D) if heads_first else (B, T, H, D)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=i < 3) for i in range(4))
    with torch.no_grad():
        fwd = do_bench(lambda: fn(q, k, v), return_mode="median")
    fwd_bwd = do_bench(lambda: fn(q, k, v).backward(do), grad_to_none=[q, k, v], return_mode="median")
    return fwd, fwd_bwd


def write_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [(axes[0], "fwd_tflops", "forward"), (axes[1], "fwd_bwd_tflops", "forward+backward")]
    for ax, key, title in panels:
        for method, full in sorted({(r["method"], r["window"] is None) for r in rows}):
            pts = [r for r in rows if r["method"] == method and (r["window"] is None) == full]
            ax.plot([r["T"] for r in pts], [r[key] for r in pts], marker="o",
                    label=f"{method} ({'causal' if full else 'window T/4'})")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="T", ylabel="TFLOP/s", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table_row(r):
    return (f"| {r['T']} | {r['window'] or '-'} | {r['method']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_tflops']:.1f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.1f} |")


def target_lines(rows, seqlens):
    by_key = {(r["method"], r["T"], r["window"]): r for r in rows}
    get = lambda method, T, window: by_key.get((method, T, window))
    lines = []
    r = get("triton", 4096, None)
    if r:
        lines.append(f"- fwd T=4096 causal >= 450 TFLOP/s: {r['fwd_tflops']:.0f} "
                     f"({'met' if r['fwd_tflops'] >= 450 else 'NOT met'})")
    for T in seqlens:
        t, s = get("triton", T, None), get("sdpa_flash", T, None)
        if t and s:
            ratio = s["fwd_bwd_ms"] / t["fwd_bwd_ms"]
            lines.append(f"- fwd+bwd T={T} speedup vs SDPA flash >= 1.1x: {ratio:.2f}x "
                         f"({'met' if ratio >= 1.1 else 'NOT met'})")
    full, win = get("triton", 8192, None), get("triton", 8192, 8192 // 4)
    if full and win:
        ratio = full["fwd_bwd_ms"] / win["fwd_bwd_ms"]
        lines.append(f"- window T/4 vs full causal at T=8192 (fwd+bwd) >= 2x: {ratio:.2f}x "
                     f"({'met' if ratio >= 2 else 'NOT met'})")
    return lines


def main():
    parser = ArgParser(description=__doc__.strip().splitlines()[0])
    parser.add("--batch", type=int, min=1, default=4)
    parser.add("--heads", type=int, min=1, default=16)
    parser.add("--head-dim", type=int, min=1, default=128)
    parser.add("--seqlens", type=int, min=1, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add("--out-dir", path="out", default="dev")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU; nothing to do on CPU.")
        return
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex_compiled = torch.compile(flex_attention)
    B, H, D, dtype = args.batch, args.heads, args.head_dim, getattr(torch, args.dtype)
    rows = []
    for T in args.seqlens:
        for window in (None, T // 4):
            flops = 4 * B * H * D * visible_pairs(T, window)
            methods = make_methods(T, window, flex_compiled, create_block_mask)
            for method, (fn, heads_first) in methods.items():
                fwd, fwd_bwd = bench(fn, heads_first, B, T, H, D, dtype)
                rows.append(dict(T=T, window=window, method=method, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                                 fwd_tflops=flops / fwd * 1e-9, fwd_bwd_tflops=3.5 * flops / fwd_bwd * 1e-9))
                print(table_row(rows[-1]), flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    title = f"# Attention benchmark ({torch.cuda.get_device_name()}, {args.dtype}, B={B} H={H} D={D}, causal)"
    lines = [title, "", "| T | window | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|", *map(table_row, rows)]
    targets = target_lines(rows, args.seqlens)
    lines += ["", "Targets (H100):", *targets, ""]
    with open(os.path.join(args.out_dir, "bench_attention.md"), "w") as f:
        f.write("\n".join(lines))
    write_plot(rows, os.path.join(args.out_dir, "bench_attention.png"))
    print("\n".join(targets))


if __name__ == "__main__":
    sys.exit(main())
