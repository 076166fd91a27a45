"""
Depth coordinate check (CompleteP, Dey et al. 2025, arXiv 2505.01618, Fig. 2 / sec. 4): at a fixed width, train
models of several depths a few real optimizer steps on Shakespeare bytes and fit log2(size) vs log2(depth) for
the residual stream, its change, the logits and the per-layer updates. With the depth rule (branches multiplied
by (L_base/L)^alpha, `GPTConfig.depth_alpha` = 1) every slope is ~0; without it the stream's change and the
logits grow with depth, because L blocks each add an update of the same size.
"""

import math

import torch

from nanochat.coord_check import CHECK_LR_MULT, VOCAB, byte_batches, drop_init_noise, load_text_bytes, rms
from nanochat.gpt import GPTConfig, build_model

QUANTITIES = ("stream", "stream_change", "layer_update", "logits", "target_logit", "dw_rms")


def depth_config(depth, rule, width=64, head_dim=32, base_depth=2, seq_len=64):
    """muP at its own base width (width-wise identical to SP), with the CompleteP depth rule
    (`rule` = alpha > 0, base depth `base_depth`) or without any depth rule (`rule` = 0)."""
    depth_kw = dict(mup_base_n_layer=base_depth, depth_alpha=float(rule)) if rule else {}
    return GPTConfig(sequence_len=seq_len, vocab_size=VOCAB, n_layer=depth, n_head=width // head_dim,
                     n_kv_head=width // head_dim, n_embd=width, mup_base_width=width, **depth_kw)


@torch.no_grad()
def measure(model, x, y):
    """Final residual stream, each block's contribution (output minus input, the scaled branches) and the logits
    (after the muP multiplier, before the softcap) on a fixed batch."""
    contrib, final = [], {}

    def block_hook(m, inp, out):
        contrib.append(out - inp[0])
        final["h"] = out

    hooks = [b.register_forward_hook(block_hook) for b in model.transformer.h]
    hooks.append(model.lm_head.register_forward_hook(lambda m, i, o: final.__setitem__("z", o)))
    model(x)
    for h in hooks:
        h.remove()
    z = final["z"].float() * model.config.logit_mult
    return final["h"].float(), [c.float() for c in contrib], z


def stats(model, x, y, ref):
    """Sizes at this step; `ref` = the measurements at init (step 0)."""
    h, contrib, z = measure(model, x, y)
    h0, contrib0, _ = ref
    zt = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - z.mean(-1)  # target logit vs the mean: what training moves
    return {
        "stream": rms(h),
        "stream_change": rms(h - h0) / rms(h0),
        # the mean change of one layer's contribution, in units of its 1/L share of the stream: flat in depth =
        # every layer keeps learning features as L grows (CompleteP's "complete" feature learning)
        "layer_update": sum(rms(c - c0) for c, c0 in zip(contrib, contrib0)) / rms(h0),
        "logits": rms(z),
        "target_logit": zt.mean().item(),
    }




def run_one(depth, rule, steps=5, seed=0, matrix_optimizer="muon", width=64, base_depth=2, B=8, T=64, data=None,
            lr_mult=CHECK_LR_MULT, device="cpu"):
    """{step: {quantity: value}} after each of `steps` real optimizer steps (the model's own setup_optimizer, every
    LR times `lr_mult`)."""
    data = load_text_bytes() if data is None else data
    torch.manual_seed(seed)
    model = build_model(depth_config(depth, rule, width, base_depth=base_depth, seq_len=T), device)
    opt = model.setup_optimizer(matrix_optimizer=matrix_optimizer)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] = g["base_lr"] * lr_mult
    train = byte_batches(data, B, T, steps, seed=1000 + seed, split="train", device=device)
    xe, ye = byte_batches(data, B, T, 1, seed=12345, split="val", device=device)[0]
    ref = measure(model, xe, ye)
    out = {0: stats(model, xe, ye, ref)}
    mats = [p for n, p in model.named_parameters() if n.startswith("transformer.h.")]
    for step, (xb, yb) in enumerate(train, start=1):
        before = [p.detach().clone() for p in mats]
        loss = model(xb, yb)
        loss.backward()
        if step == 1:
            drop_init_noise(model)
        opt.step()
        model.zero_grad(set_to_none=True)
        out[step] = {**stats(model, xe, ye, ref), "loss": loss.item(),
                     "dw_rms": sum(rms(p - b) for p, b in zip(mats, before)) / len(mats)}
    return out


def run_depth_check(depths, rules=(0, 1), steps=5, seeds=(0, 1, 2), matrix_optimizer="muon", log=print, **kw):
    """All runs; records [dict(rule, depth, seed, step, quantity, value)]."""
    data = load_text_bytes()
    recs = []
    for rule in rules:
        for depth in depths:
            for seed in seeds:
                res = run_one(depth, rule, steps, seed, matrix_optimizer, data=data, **kw)
                if log:
                    log(f"{matrix_optimizer} alpha={rule} depth {depth} seed {seed}: loss {res[steps]['loss']:.3f}")
                recs += [dict(rule=rule, depth=depth, seed=seed, step=s, quantity=q, value=v)
                         for s, st in res.items() for q, v in st.items()]
    return recs


def slopes(recs, step):
    """{(rule, quantity): log2-log2 slope vs depth of the seed-mean at `step`} (least squares)."""
    cells = {}
    for r in recs:
        if r["step"] == step and r["quantity"] in QUANTITIES:
            cells.setdefault((r["rule"], r["quantity"]), {}).setdefault(r["depth"], []).append(r["value"])
    out = {}
    for key, by_depth in cells.items():
        xs = [math.log2(d) for d in sorted(by_depth)]
        ys = [math.log2(max(abs(sum(v) / len(v)), 1e-30)) for _, v in sorted(by_depth.items())]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        out[key] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return out


def plot_depth_check(recs, path, steps, title=""):
    """One panel per quantity: seed-mean (error bar: min..max over seeds) vs depth, log-log; color = depth rule,
    line style = step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {}
    for r in recs:
        cells.setdefault((r["rule"], r["quantity"], r["step"]), {}).setdefault(r["depth"], []).append(abs(r["value"]))
    rules = sorted({r["rule"] for r in recs})
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(3.0 * len(QUANTITIES), 3.2), squeeze=False)
    for ax, q in zip(axes[0], QUANTITIES):
        for ri, rule in enumerate(rules):
            for si, step in enumerate(steps):
                by_d = cells.get((rule, q, step))
                if not by_d or min(min(v) for v in by_d.values()) <= 0:
                    continue
                ds = sorted(by_d)
                mid = [sum(by_d[d]) / len(by_d[d]) for d in ds]
                err = [[m - min(by_d[d]) for m, d in zip(mid, ds)], [max(by_d[d]) - m for m, d in zip(mid, ds)]]
                name = f"CompleteP alpha={rule:g}" if rule else "no depth rule"
                ax.errorbar(ds, mid, yerr=err, color=("tab:red", "tab:blue", "tab:green")[ri % 3], capsize=2,
                            ls=("-", "--", ":", "-.")[si % 4], marker=".", lw=1, label=f"{name}, step {step}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(q, fontsize=9)
        ax.set_xlabel("depth", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
