"""
muP evidence, part 2: hyperparameter transfer across width (Tensor Programs V, Yang et al. 2022, sec. 1, Fig. 1).

`train_once` trains one short byte-level Shakespeare run; the LR multiplier scales every LR of
`setup_optimizer` (matrix, embedding, unembedding, scalar): a global LR, as in TP5's transfer plots, so the
SP/muP difference at the embedding and readout (the only places they differ with Muon) is inside the swept
knob. `fit_optimum` and `transfer_summary` turn result rows into the fitted optimum per width and its spread.
"""

import json
import math
import os

import numpy as np
import torch

from nanochat.coord_check import build_model, byte_batches, load_text_bytes

KEY_FIELDS = ("setup", "mode", "width", "lr_log2", "output_mult", "seed", "steps", "depth", "head_dim", "B", "T",
              "base_width")


def train_once(width, mode="mup", lr_log2=0.0, seed=0, steps=80, setup="muon", output_mult=1.0, depth=2,
               head_dim=32, B=8, T=64, base_width=64, warmdown=0.3, data=None, n_val=8, device="cpu", base_depth=0):
    """One training run; returns its JSON row (config + train loss averaged over the last 10% of steps
    + val loss on fixed val batches). Constant LR, then linear warmdown to 0 over the last `warmdown` fraction
    (a final loss that is less noisy than constant LR at the same cost). A `base_depth` other than `depth` is
    refused (muP covers width only)."""
    data = load_text_bytes() if data is None else data
    torch.manual_seed(seed)
    model = build_model(width, mode == "mup", base_width, head_dim, depth, T, seed, output_mult, device,
                        base_depth=base_depth)
    mult = 2.0**lr_log2
    lrs = dict(matrix_lr={"muon": 0.02, "adamw": 0.003}[setup], embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5)
    opt = model.setup_optimizer(**{k: v * mult for k, v in lrs.items()}, matrix_optimizer=setup)
    # the same batches at every width and LR: the curves differ only by the model
    train = byte_batches(data, B, T, steps, seed=seed, split="train", device=device)
    losses = []
    n_flat = int(steps * (1 - warmdown))
    for step, (x, y) in enumerate(train):
        frac = 1.0 if step < n_flat else (steps - step) / (steps - n_flat)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * frac
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    last = losses[-max(1, steps // 10):]
    train_loss = sum(last) / len(last) if len(losses) == steps else float("nan")
    val_loss = float("nan")
    if math.isfinite(train_loss):
        with torch.no_grad():
            model.eval()
            val_batches = byte_batches(data, B, T, n_val, seed=777, split="val", device=device)
            val = [model(x, y).item() for x, y in val_batches]
            val_loss = sum(val) / len(val)
    row = dict(setup=setup, mode=mode, width=width, lr_log2=float(lr_log2), output_mult=float(output_mult), seed=seed,
               steps=steps, depth=depth, head_dim=head_dim, B=B, T=T, base_width=base_width)
    row.update(train_loss=train_loss, val_loss=val_loss)
    return row


def row_key(row):
    return tuple(row[k] for k in KEY_FIELDS)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path, row):
    """Append one JSON line with flush + fsync (O_APPEND: concurrent shards do not interleave a line)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------------------------------
# analysis


def mean_curves(rows, metric="train_loss", hp="lr_log2"):
    """{(mode, width): (xs, mean, std, n)} over seeds; a diverged run (nan/inf) counts as +inf."""
    acc = {}
    for r in rows:
        v = r[metric]
        v = v if v is not None and math.isfinite(v) else float("inf")
        acc.setdefault((r["mode"], r["width"]), {}).setdefault(r[hp], []).append(v)
    out = {}
    for key, by_x in acc.items():
        xs = sorted(by_x)
        out[key] = (xs, [float(np.mean(by_x[x])) for x in xs], [float(np.std(by_x[x])) for x in xs],
                    [len(by_x[x]) for x in xs])
    return out


def fit_optimum(xs, ys):
    """Optimum in x (e.g. log2 LR): vertex of the parabola through the best point and its two neighbours,
    clamped to that bracket; the best point itself at the edge of the grid or when the fit is not convex."""
    i = int(np.argmin(ys))
    if not math.isfinite(ys[i]):
        return float("nan")
    if i == 0 or i == len(xs) - 1 or not all(math.isfinite(y) for y in ys[i - 1 : i + 2]):
        return float(xs[i])
    a, b, _ = np.polyfit(xs[i - 1 : i + 2], ys[i - 1 : i + 2], 2)
    if a <= 0:
        return float(xs[i])
    return float(min(max(-b / (2 * a), xs[i - 1]), xs[i + 1]))


def transfer_summary(rows, metric="train_loss", hp="lr_log2"):
    """Fitted optimum per (mode, width), spread per mode (max - min of optima), and the muP
    'wider is better' check (loss falls monotonically with width at every x within 2 of the muP optimum)."""
    curves = mean_curves(rows, metric, hp)
    optima = {k: fit_optimum(c[0], c[1]) for k, c in curves.items()}
    spread = {}
    for mode in ("sp", "mup"):
        opts = [v for (m, _), v in optima.items() if m == mode and math.isfinite(v)]
        spread[mode] = max(opts) - min(opts) if len(opts) > 1 else float("nan")
    wider = None
    mup_w = sorted(w for m, w in curves if m == "mup")
    if len(mup_w) > 1:
        center = float(np.mean([optima[("mup", w)] for w in mup_w]))
        wider = True
        xs_all = sorted(set.intersection(*[set(curves[("mup", w)][0]) for w in mup_w]))
        for x in xs_all:
            if abs(x - center) > 2:
                continue
            ys = [curves[("mup", w)][1][curves[("mup", w)][0].index(x)] for w in mup_w]
            wider &= all(b <= a for a, b in zip(ys, ys[1:]))
    return dict(curves=curves, optima=optima, spread=spread, wider_is_better=wider)
