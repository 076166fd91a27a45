"""
The choice `auto` makes in base_train, checked and timed once per case before the model is compiled.

Per case (attention: dtype, head_dim, window, GQA ratio; head: dtype, vocab) the Triton kernel is first checked
against the PyTorch path on a small input, output and input gradients, by the tests' rule (flash-attn's): its error
against a higher-precision reference (fp32; fp64 for an fp32 case) is at most twice the PyTorch path's own error,
plus 1e-5 of the reference's scale. Then forward+backward of both is timed at the run's real shape. `auto` takes the
kernel only where it is correct and not slower; `triton` takes it anyway (the verdict is still printed); `sdpa`,
`chunked` and `eager` skip the check, and so does `auto` off CUDA (the interpreter is for tests).

The result is set on the modules (CausalSelfAttention.attn_impl per layer, GPT.head_impl) before torch.compile
traces them, so the compiled graph holds one path and no training step decides anything. Each verdict is printed
once, with both timings, and the record goes into config.json under "kernels".
"""

import statistics
import time

import torch
import torch.distributed as dist

import kernels.attention_torch as attention_torch
import kernels.head_torch as head_torch
from nanochat.gpt import attention

CHECK_T = 200  # the attention check's longest length: several 64-128-row tiles, a ragged last one
CHECK_N = 250  # the head check's tokens: several chunks' worth of rows, not a multiple of a tile
REPS = {"cuda": 10, "cpu": 1}  # timed calls of each path (the interpreter on CPU is only ever timed in tests)
CHECKED = {"cuda"}  # devices where `auto` checks and times the kernels; elsewhere they run only in tests

# -----------------------------------------------------------------------------
# correctness: errors of the kernel and of the PyTorch path against a higher-precision reference


def grads_of(fn, inputs, grad):
    """[output, grad of each floating-point input] of fn(*inputs) backpropagating grad."""
    inputs = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs if t.is_floating_point()]


def rel_errs(outs, refs):
    """Per output: max |out - ref| over max |ref| (over 1 where the reference is all zero)."""
    return [((o.double() - r.double()).abs().max() / (r.double().abs().max().item() or 1.0)).item()
            for o, r in zip(outs, refs, strict=True)]


def check_attention(dtype, T, group, head_dim, window, scale, device):
    """({output: error} of the Triton kernel, of SDPA) for o, dq, dk, dv on a small random input of this case (at
    most CHECK_T of the run's T positions)."""
    import kernels.attention  # looked up at call time, like the model does (tests inject kernels here)

    T, H_kv = min(T, CHECK_T), 2
    q_shape, kv_shape = (2, T, H_kv * group, head_dim), (2, T, H_kv, head_dim)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(s, generator=g).to(device, dtype) for s in (q_shape, kv_shape, kv_shape, q_shape))
    win = None if window is None else min(window, max(1, T // 3))  # a window that binds at this length
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    ref = grads_of(lambda q, k, v: attention_torch.attention_reference(q, k, v, scale=scale, window=win),
                   [t.to(hi) for t in (q, k, v)], do.to(hi))
    tri = grads_of(lambda q, k, v: kernels.attention.flash_attention(q, k, v, scale=scale, window=win), [q, k, v], do)
    sdpa = grads_of(lambda q, k, v: attention(q, k, v, scale, win, "sdpa"), [q, k, v], do)
    names = ("o", "dq", "dk", "dv")
    return dict(zip(names, rel_errs(tri, ref))), dict(zip(names, rel_errs(sdpa, ref)))


def check_head(dtype, d, vocab, logit_mult, softcap, device):
    """({output: error} of the Triton head, of eager PyTorch in the same dtype) for the loss, grad_x and grad_W on a
    small random input of this case (test_head's rule: eager in the case's dtype is PyTorch's own error)."""
    import kernels.head

    g = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_N, d, generator=g) * 4  # logits large enough that the softcap bends them
    w = torch.randn(vocab, d, generator=g) / d**0.5
    t = torch.randint(0, vocab, (CHECK_N,), generator=g)
    t[::7] = -1
    x, w, t = x.to(device), w.to(device), t.to(device)
    kw = dict(logit_mult=logit_mult, softcap=softcap)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    one = torch.ones((), device=device)
    ref = grads_of(lambda x, w: head_torch.eager_linear_cross_entropy(x, w, t, **kw), [x.to(hi), w.to(hi)], one.to(hi))
    tri = grads_of(lambda x, w: kernels.head.fused_linear_cross_entropy(x, w, t, **kw), [x.to(dtype), w.to(dtype)], one)
    eager = grads_of(lambda x, w: head_torch.eager_linear_cross_entropy(x, w, t, **kw), [x.to(dtype), w.to(dtype)], one)
    names = ("loss", "grad_x", "grad_W")
    return dict(zip(names, rel_errs(tri, ref))), dict(zip(names, rel_errs(eager, ref)))


def correct(errs, ref_errs):
    return all(errs[k] <= 2 * ref_errs[k] + 1e-5 for k in errs)


# -----------------------------------------------------------------------------
# speed: forward + backward at the run's real shape


def timed(fn, device):
    """Seconds of one call; on CUDA between two events on the stream (host time spent inside fn counts too)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_pair(kernel_step, other_step, device):
    """Median seconds of the two steps, called alternately after one warm-up call each (compilation, autotuning)."""
    kernel_step(), other_step()
    times = ([], [])
    for _ in range(REPS.get(device.type, 2)):
        for ts, step in zip(times, (kernel_step, other_step)):
            ts.append(timed(step, device))
    return tuple(statistics.median(ts) for ts in times)


def fwd_bwd_step(fn, inputs, grad):
    """A closure running fn forward and backward on fresh leaves of `inputs` (no gradient accumulates)."""
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    return step


def time_attention(dtype, B, T, H, H_kv, head_dim, window, scale, device):
    import kernels.attention

    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(s, generator=g).to(device, dtype)
                   for s in [(B, T, H, head_dim), (B, T, H_kv, head_dim), (B, T, H_kv, head_dim), (B, T, H, head_dim)])
    tri = fwd_bwd_step(lambda q, k, v: kernels.attention.flash_attention(q, k, v, scale=scale, window=window),
                       [q, k, v], do)
    sdpa = fwd_bwd_step(lambda q, k, v: attention(q, k, v, scale, window, "sdpa"), [q, k, v], do)
    return time_pair(tri, sdpa, device)


def time_head(dtype, N, d, vocab, logit_mult, softcap, device):
    import kernels.head

    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, d, generator=g).to(device, dtype)
    w = (torch.randn(vocab, d, generator=g) / d**0.5).to(device, dtype)
    t = torch.randint(0, vocab, (N,), generator=g).to(device)
    kw = dict(logit_mult=logit_mult, softcap=softcap)
    one = torch.ones((), device=device)
    tri = fwd_bwd_step(lambda x, w: kernels.head.fused_linear_cross_entropy(x, w, t, **kw), [x, w], one)
    chunked = fwd_bwd_step(lambda x, w: head_torch.chunked_linear_cross_entropy(x, w, t, **kw), [x, w], one)
    return time_pair(tri, chunked, device)


# -----------------------------------------------------------------------------
# the choice


def decide(requested, alternative, device, why_not, check, timing):
    """The implementation to run and the verdict record. check() -> (kernel errors, PyTorch errors);
    timing() -> (kernel seconds, PyTorch seconds)."""
    if requested not in ("auto", "triton"):
        return requested, dict(impl=requested, requested=requested, reason="requested: no check")
    if requested == "auto" and device.type not in CHECKED:
        return alternative, dict(impl=alternative, requested=requested,
                                 reason=f"auto on {device.type}, where the kernels run only in tests")
    if why_not:  # an explicit `triton` that cannot run is refused by the model (and by base_train before this)
        return alternative, dict(impl=alternative, requested=requested, reason=f"the kernel cannot run {why_not}")
    errs, ref_errs = check()
    ok = correct(errs, ref_errs)
    t_kernel, t_other = timing()
    use = requested == "triton" or (ok and t_kernel <= t_other)
    reason = ("forced by triton" if requested == "triton" else "correct and not slower" if use
              else "slower" if ok else "incorrect")
    return ("triton" if use else alternative), dict(
        impl="triton" if use else alternative, requested=requested, reason=reason, correct=ok,
        errors={k: [errs[k], ref_errs[k]] for k in errs}, ms=[1e3 * t_kernel, 1e3 * t_other])


def verdict_line(what, v, alternative, reference):
    """One printed line: the case, both timings and errors (the reference: the PyTorch path whose error is the
    yardstick), the choice and why."""
    if "ms" not in v:
        return f"kernel choice: {what}: {v['impl']} ({v['reason']})"
    worst = max(v["errors"], key=lambda k: v["errors"][k][0] / (2 * v["errors"][k][1] + 1e-5))
    err, ref = v["errors"][worst]
    ok = "correct" if v["correct"] else "INCORRECT"
    return (f"kernel choice: {what}: triton {v['ms'][0]:.3f} ms vs {alternative} {v['ms'][1]:.3f} ms fwd+bwd; "
            f"{ok} (worst: {worst} error {err:.2e} vs {reference}'s {ref:.2e}, limit 2x + 1e-5) -> {v['impl']} "
            f"({v['reason']})")


def choose_kernels(model, batch_size, dtype, log=print):
    """Resolve `auto` (and check `triton`) for every attention case and the head of `model`, for a run of batch_size
    sequences of config.sequence_len tokens with compute dtype `dtype` (autocast's, or the weights' in fp32), on the
    model's device. Sets the modules' attn_impl / head_impl, prints each verdict, returns the record."""
    cfg, device = model.config, model.cos.device
    T, D, group = cfg.sequence_len, cfg.head_dim, cfg.n_head // cfg.n_kv_head
    name = str(dtype).split(".")[-1]
    record = dict(attention=[], head=None)
    layers_of = {}
    for i, window in enumerate(model.windows):
        layers_of.setdefault(window, []).append(i)
    H, H_kv, scale = cfg.n_head, cfg.n_kv_head, cfg.attn_scale
    for window, layers in layers_of.items():
        impl, v = decide(
            cfg.attn_impl, "sdpa", device, attention_torch.unsupported(device.type, dtype, D),
            lambda w=window: check_attention(dtype, T, group, D, w, scale, device),
            lambda w=window: time_attention(dtype, batch_size, T, H, H_kv, D, w, scale, device))
        for i in layers:
            model.transformer.h[i].attn.attn_impl = impl
        case = dict(dtype=name, head_dim=D, window=window, gqa=group, layers=layers, batch=batch_size, seq=T)
        record["attention"].append(dict(case, **v))
        log(verdict_line(f"attention {name} head_dim {D} window {window} GQA {group}:1 layers {layers} "
                         f"(B={batch_size} T={T})", v, "sdpa", "sdpa"))
    V, d = cfg.vocab_size, model.lm_head.weight.size(1)  # the rows GPT._fused_loss scores (never the padding)
    impl, v = decide(
        cfg.head_impl, "chunked", device, head_torch.unsupported(device.type, dtype),
        lambda: check_head(dtype, d, V, cfg.logit_mult, cfg.softcap, device),
        lambda: time_head(dtype, batch_size * T, d, V, cfg.logit_mult, cfg.softcap, device))
    model.head_impl = impl
    record["head"] = dict(dtype=name, vocab=V, d=d, tokens=batch_size * T, **v)
    log(verdict_line(f"head {name} vocab {V} (N={batch_size * T} d={d})", v, "chunked", "eager"))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the timing inputs are gone; give their blocks back before training allocates
    return record


def agree_across_ranks(model, record, log=print):
    """Under torch.distributed: a case keeps the kernel only where every rank chose it (each rank checked and timed
    on its own GPU), so all ranks run the same code. Returns the record with the agreed choices."""
    if not dist.is_initialized():
        return record
    rows = record["attention"] + [record["head"]]
    mine = torch.tensor([float(r["impl"] == "triton") for r in rows], device=model.cos.device)
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    for row, keep in zip(rows, mine.tolist(), strict=True):
        if row["impl"] == "triton" and not keep:
            alternative = "chunked" if row is record["head"] else "sdpa"
            row.update(impl=alternative, reason=row["reason"] + "; another rank chose " + alternative)
            log(f"kernel choice: {alternative} for {row.get('layers', 'the head')}: another rank chose it")
    for row in record["attention"]:
        for i in row["layers"]:
            model.transformer.h[i].attn.attn_impl = row["impl"]
    model.head_impl = record["head"]["impl"]
    return record
