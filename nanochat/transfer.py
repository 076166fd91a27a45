"""
Hyperparameter transfer across width (Tensor Programs V, Yang et al. 2022, sec. 1 and Fig. 1), on the training
path itself: `scripts/sweep.sh` runs one `scripts/base_train.py` per grid point, this module plans the swept
options, reads the run directories back and fits them; `scripts/transfer_report.py` prints and plots the result.

One hyperparameter is swept at a time, as multipliers 2^x on its base value with every other at its base (TP5
tunes and transfers each group separately; a single global multiplier mixes groups whose optima differ).
The fitted optimum per width is the vertex of a parabola in x through the best grid point and its neighbours;
the bootstrap resamples seeds; the transfer summary is the slope of the optimum against log2(width), which muP
predicts to be 0 and SP predicts to drift where its rule differs from muP's.

    python -m nanochat.transfer plan DIR HP "MULTS" "MODES" "WIDTHS" "ALPHAS" "BATCHES" "HORIZONS" -- [options]
"""

import argparse
import json
import math
import os
import sys

import numpy as np

from nanochat.config import GPTConfig, OptimConfig

# hp -> the base_train options it scales (a global LR scales every LR group together)
LR_OPTS = ("--matrix-lr", "--embedding-lr", "--unembedding-lr", "--scalar-lr")
HPS = {
    "matrix_lr": ("--matrix-lr",),
    "embedding_lr": ("--embedding-lr",),
    "unembedding_lr": ("--unembedding-lr",),
    "scalar_lr": ("--scalar-lr",),
    "lr": LR_OPTS,
    "output_mult": ("--output-mult",),
    "attn_mult": ("--attn-mult",),
    "weight_decay": ("--weight-decay",),
    "init_scale": ("--init-scale",),
}
MUP_ONLY = {"output_mult", "attn_mult"}  # SP has no such knob (its logits and attention scale are fixed)
OWNED = ("--n-embd", "--n-head", "--mup-base-width", "--depth", "--seed", "--out-dir", "--resume")  # set per point
HORIZON_OPTS = ("--target-tokens", "--num-iterations", "--target-param-data-ratio", "--target-flops")


def _spellings(opt):
    return [opt, "--" + opt[2:].replace("-", "_")]


def base_values(extra):
    """The base value of every sweepable option: as given in `extra` (base_train options), else base_train's
    default. attn_mult's default 0 means sqrt(base head_dim) (GPTConfig), resolved here so it can be scaled."""
    p = argparse.ArgumentParser(add_help=False)
    opts = sorted({o for v in HPS.values() for o in v} | {"--matrix-optimizer", "--head-dim", "--mup-base-head-dim"})
    for o in opts:
        p.add_argument(*_spellings(o), dest=o)
    ns, _ = p.parse_known_args(extra)
    got = {o: getattr(ns, o) for o in opts}
    hp = OptimConfig(matrix_optimizer=got["--matrix-optimizer"] or OptimConfig.matrix_optimizer)
    defaults = {"--matrix-lr": hp.hidden_lr(), "--embedding-lr": hp.embedding_lr, "--unembedding-lr": hp.unembedding_lr,
                "--scalar-lr": hp.scalar_lr, "--weight-decay": hp.weight_decay, "--output-mult": GPTConfig.output_mult,
                "--init-scale": GPTConfig.init_scale, "--attn-mult": 0.0}
    out = {o: float(got[o]) if got[o] is not None else d for o, d in defaults.items()}
    out["head_dim"] = int(got["--head-dim"] or 64)
    if out["--attn-mult"] == 0:
        out["--attn-mult"] = math.sqrt(float(got["--mup-base-head-dim"] or out["head_dim"]))
    return out


def plan(out_dir, hp, mults, modes, widths, extra, alphas=(), batches=(), horizons=()):
    """Check a sweep's definition and return {x: [base_train args setting the swept options to base * 2^x]}.
    Records it in out_dir/sweep.json; an existing one must agree (a resumed sweep keeps its meaning).
    `alphas`: the depth-rule axis (sweep.sh --alphas); `batches`, `horizons`: total batch and training tokens per
    point (--batches, --horizons); each recorded only when given. Raises ValueError with a one-line message."""
    if hp not in HPS:
        raise ValueError(f"--hp {hp}: not sweepable: pass one of {', '.join(HPS)}")
    if hp in MUP_ONLY and "sp" in modes:
        raise ValueError(f"--hp {hp} is a muP knob (SP has none): pass --modes mup")
    for a in alphas:
        if not (float(a) == 0 or 0.5 <= float(a) <= 1):
            raise ValueError(f"--alphas: {a} is not a depth exponent: pass 0 (no depth rule) or one in [0.5, 1]")
        if float(a) and "sp" in modes:
            raise ValueError(f"--alphas: alpha {a} is a rule relative to a muP base: pass --modes mup")
    owned = (OWNED + (("--depth-alpha", "--mup-base-depth") if alphas else ())
             + (("--total-batch-size",) if batches else ()) + (HORIZON_OPTS if horizons else ()))
    for a in extra:
        if a.split("=")[0].replace("_", "-") in owned:
            raise ValueError(f"base_train option {a} is set by the sweep for every point: use the sweep's flags "
                             "(--widths, --depths, --base-depth, --alphas, --batches, --horizons, --seeds, "
                             "--base-width, --out)")
    bases = base_values(extra)
    hd = int(bases.pop("head_dim"))
    for w in widths:  # base_train would otherwise round the head count and silently change the head dim
        if int(w) % hd:
            raise ValueError(f"width {w} is not a multiple of the head dim {hd}: pick multiples of it or pass "
                             "--head-dim after --")
    for o in HPS[hp]:
        if bases[o] == 0:
            raise ValueError(f"--hp {hp}: the base value of {o} is 0 and 2^x * 0 = 0: pass {o} V (V > 0) after --")
    xs = [float(m) for m in mults]
    meta = dict(hp=hp, options=list(HPS[hp]), base={o: bases[o] for o in HPS[hp]}, extra=list(extra))
    for name, axis in (("alphas", alphas), ("batches", batches), ("horizons", horizons)):
        if axis:
            meta[name] = [float(a) if name == "alphas" else int(a) for a in axis]
    path = os.path.join(out_dir, "sweep.json")
    if os.path.exists(path):
        old = json.load(open(path))
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"--out {out_dir} holds another sweep ({old.get('hp')}, base {old.get('base')}, options "
                             f"{' '.join(old.get('extra', []))}): pick another --out or delete it")
    else:
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # shards starting together each write a whole file
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, path)
    return {x: [a for o in HPS[hp] for a in (o, f"{bases[o] * 2.0 ** x:.6g}")] for x in xs}


def drop_options(opts, names):
    """base_train options without the ones in `names` (either spelling, with or without =value)."""
    out, skip = [], False
    for a in opts:
        if skip:
            skip = False
        elif a.split("=")[0].replace("_", "-") in names:
            skip = "=" not in a
        else:
            out.append(a)
    return out


# -----------------------------------------------------------------------------------------------------
# reading run directories


def swept_options(sweep_dirs):
    """Every base_train option some sweep in `sweep_dirs` varies: drop these before comparing sweeps' options."""
    return {o for d in sweep_dirs for o in json.load(open(os.path.join(d, "sweep.json")))["options"]}


def read_runs(sweep_dir):
    """One row per finished point of a sweep directory (the ones with a DONE marker): mode, width, depth, seed, x
    (log2 multiplier), batch and tokens (as trained: config.json), val_bpb (the final evaluation) and train_loss
    (mean of the last 10% of steps). A run that stopped on a non-finite value (base_train exit 3: it diverged)
    counts as +inf."""
    meta = json.load(open(os.path.join(sweep_dir, "sweep.json")))
    rows = []
    for name in sorted(os.listdir(sweep_dir)):
        run = os.path.join(sweep_dir, name)
        done = os.path.join(run, "DONE")
        if not os.path.isfile(done):
            continue
        row = dict(json.load(open(os.path.join(run, "point.json"))), hp=meta["hp"], run=run)
        cfg = json.load(open(os.path.join(run, "config.json")))
        row["base_width"] = cfg["model_config"]["mup_base_width"]
        row["batch"], row["tokens"] = cfg.get("total_batch"), cfg.get("scaling", {}).get("tokens")
        a = cfg.get("args", {})
        if row["tokens"] is None and row["batch"] and "num_iterations" in a:  # an older base_train: count its steps
            steps = math.ceil(a["target_tokens"] / row["batch"]) if a.get("target_tokens") else a["num_iterations"]
            row["tokens"] = steps * row["batch"]
        status = open(done).read().strip()
        m = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
        evals = [r["val_bpb"] for r in m if "val_bpb" in r]
        if status == "ok" and m and evals:
            last = m[-max(1, len(m) // 10):]
            row.update(val_bpb=evals[-1], train_loss=sum(r["train_loss"] for r in last) / len(last))
        else:
            row.update(val_bpb=math.inf, train_loss=math.inf)
        row["diverged"] = status != "ok"
        rows.append(row)
    return meta, rows


# -----------------------------------------------------------------------------------------------------
# fitting


def fit_optimum(xs, ys):
    """Optimum in x (log2 multiplier): vertex of the parabola through the best point and its two neighbours,
    clamped to that bracket; the best point itself at the edge of the grid or when the fit is not convex.
    A missing point (nan) counts as +inf, like a diverged one."""
    ys = [math.inf if math.isnan(y) else y for y in ys]
    i = int(np.argmin(ys))
    if not math.isfinite(ys[i]):
        return math.nan
    if i == 0 or i == len(xs) - 1 or not all(math.isfinite(y) for y in ys[i - 1:i + 2]):
        return float(xs[i])
    a, b, _ = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
    if a <= 0:
        return float(xs[i])
    return float(min(max(-b / (2 * a), xs[i - 1]), xs[i + 1]))


AXES = ("width", "batch", "tokens")


def varied(rows):
    """The axes (width, batch, tokens) along which the rows' points differ."""
    return [a for a in AXES if len({r.get(a) for r in rows}) > 1]


def grid(rows, metric, axis="width"):
    """{(group, axis value): (xs, seeds, Y)} with Y[seed index, x index] (nan where a point is missing); a group is
    (mode, depth) plus the values of the other axes that vary among the rows."""
    fixed = [a for a in varied(rows) if a != axis]
    acc = {}
    for r in rows:
        acc.setdefault(((r["mode"], r["depth"], *(r[a] for a in fixed)), r[axis]), []).append(r)
    out = {}
    for key, rs in acc.items():
        xs, seeds = sorted({r["x"] for r in rs}), sorted({r["seed"] for r in rs})
        Y = np.full((len(seeds), len(xs)), np.nan)
        for r in rs:
            Y[seeds.index(r["seed"]), xs.index(r["x"])] = r[metric]
        out[key] = (xs, seeds, Y)
    return out


def mean_curve(Y):
    """Mean over seeds per x (a diverged seed makes the point +inf; a missing one is left out)."""
    with np.errstate(invalid="ignore"):
        return [float(np.nanmean(c)) if np.isfinite(c).any() or np.isinf(c).any() else math.nan for c in Y.T]


def slope(values, optima):
    """Least-squares slope of log2(optimum multiplier) against log2 of the axis (width, batch or tokens)."""
    ok = [(math.log2(v), o) for v, o in zip(values, optima) if math.isfinite(o)]
    if len(ok) < 2:
        return math.nan
    return float(np.polyfit(*zip(*ok), 1)[0])


def summarize(rows, metric="val_bpb", n_boot=1000, seed=0, axis="width"):
    """Per group of runs that differ only along `axis` (width, batch or tokens; a group is (mode, depth) plus the
    other varied axes' values): the axis values, mean curves, fitted optima with a 95% bootstrap interval over
    seeds, the slope of the optimum vs log2 of the axis with its interval, the best loss per value and whether it
    falls at every step along the axis (for width: wider is better)."""
    rng = np.random.default_rng(seed)
    fixed = [a for a in varied(rows) if a != axis]
    g = grid(rows, metric, axis)
    out = {}
    for key in sorted({k for k, _ in g}):
        values = sorted(v for k, v in g if k == key)
        curves = [g[key, v] for v in values]
        means = [mean_curve(Y) for _, _, Y in curves]
        optima = [fit_optimum(xs, ys) for (xs, _, _), ys in zip(curves, means)]
        boot = np.full((n_boot, len(values)), np.nan)
        for b in range(n_boot):
            for j, (xs, seeds, Y) in enumerate(curves):
                boot[b, j] = fit_optimum(xs, mean_curve(Y[rng.integers(0, len(seeds), len(seeds))]))
        boot_slopes = np.array([slope(values, o) for o in boot])
        if min(len(c[1]) for c in curves) < 2:  # one seed: nothing to resample
            boot[:], boot_slopes[:] = np.nan, np.nan
        best = [min(ys) for ys in means]
        out[key] = dict(
            axis=axis, fixed=dict(zip(fixed, key[2:])), values=values, xs=[c[0] for c in curves], means=means,
            n_seeds=[len(c[1]) for c in curves],
            optima=optima, optima_ci=[ci95(boot[:, j]) for j in range(len(values))],
            slope=slope(values, optima), slope_ci=ci95(boot_slopes), best=best,
            best_falls=all(b < a for a, b in zip(best, best[1:])) if len(values) > 1 else None)
    return out


def ci95(v):
    """95% percentile interval of the finite values of v (bootstrap replicates); nan, nan if there are none."""
    v = v[np.isfinite(v)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [math.nan, math.nan]


def recommend(s, base_width, target_width):
    """log2 multiplier for the target width from one mode's summary, and how it was chosen: the mean of the
    fitted optima when the slope's interval contains 0 (transfer holds), else the fitted line extrapolated."""
    ok = [(math.log2(w), o) for w, o in zip(s["values"], s["optima"]) if math.isfinite(o)]
    if not ok:
        return math.nan, "no finite optimum"
    lo, hi = s["slope_ci"]
    if len(ok) < 2 or not (lo <= 1e-9 and hi >= -1e-9):  # a nan interval (one seed) counts as excluding 0
        if len(ok) >= 2:
            k, c = np.polyfit(*zip(*ok), 1)
            return float(k * math.log2(target_width) + c), f"fitted line extrapolated to width {target_width}"
        return ok[0][1], "the only width's optimum"
    return float(np.mean([o for _, o in ok])), "mean of the optima (slope interval contains 0)"


def main(argv):
    if len(argv) < 10 or argv[0] != "plan" or argv[9] != "--":
        sys.exit("usage: python -m nanochat.transfer plan DIR HP MULTS MODES WIDTHS ALPHAS BATCHES HORIZONS -- "
                 "[base_train options]")
    out_dir, hp, mults, modes, widths, alphas, batches, horizons = argv[1:9]
    try:
        for x in plan(out_dir, hp, mults.split(), modes.split(), widths.split(), argv[10:], alphas.split(),
                      batches.split(), horizons.split()).items():
            print(f"{x[0]:g}\t{' '.join(x[1])}")
    except ValueError as e:
        print(f"sweep.sh: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
