"""
A/B against nanochat itself, per token (a dev tool; it takes a nanochat checkout and never vendors its code).
Both repos train on the same shards at the same shape, batch and number of tokens, each with its own 4096-token
BPE and its own training script as a user would run it (fp32, eager, CPU), then one evaluator
(scripts/ab_eval.py) scores every byte of the same val documents once. Seeds and log2 multipliers on all of an
arm's learning rates make a grid; the report gives each arm's mean bits per byte per multiplier with a 95%
bootstrap interval over seeds, its best multiplier, and the difference of the arms' best means.

    git clone https://github.com/karpathy/nanochat ../nanochat
    python scripts/ab_nanochat.py run --out runs/ab --nanochat ../nanochat --arm nanochat --mults "3 4 5" --depth 4
    python scripts/ab_nanochat.py run --out runs/ab --arm ours --name sp --mults "-1 0 1" --depth 4 -- --matrix-lr 0.02
    python scripts/ab_nanochat.py report --out runs/ab
    python scripts/ab_nanochat.py check --nanochat ../nanochat   # same init + batches: same logits and losses?

Data: the demo corpus (`python -m nanochat.dataset shakespeare`) re-cut into short documents (paragraphs up to
--doc-chars), so that nanochat's loader, which drops the tail of every document it crops, sees about the text
ours does. Each run is OUT/<name>_d<depth>/x<mult>_s<seed>/ with run.log and, once scored, result.json; a
rerun skips scored points (resumable), `--shard i/N` splits the points over N processes. nanochat's LRs are its
own defaults times 2^x (its batch rule then scales them by sqrt(batch / 2^19)); ours are base_train's (or the
values given after --) times 2^x. nanochat has no seed option: its one torch.manual_seed(42) becomes 42 + seed.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from nanochat.common import ArgParser, atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOCHAT_LRS = {"--embedding-lr": 0.3, "--unembedding-lr": 0.008, "--matrix-lr": 0.02, "--scalar-lr": 0.5}
# nanochat's base_train as a user runs it on CPU, eager (torch.compile made the identity, as the env notes say:
# TORCH_COMPILE_DISABLE breaks its fullgraph optimizer step), its seed offset by ours
LAUNCHER = """
import runpy, sys, torch
seed = int(sys.argv[1])
sys.argv = ["scripts/base_train.py"] + sys.argv[2:]
manual_seed = torch.manual_seed
torch.manual_seed = lambda s: manual_seed(s + seed)
torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
"""

parser = ArgParser(description="per-token A/B of this repo against a nanochat checkout")
parser.add("cmd", choices=["run", "report", "check"],
           help="run: train and score a grid of one arm; report: the table; check: this repo's SP model and optimizer "
                "against nanochat's on the same weights and batches")
parser.add("--out", default="", path="out", help="the A/B directory (data, runs, report)")
parser.add("--nanochat", default="", path="dir", fix="clone karpathy/nanochat and pass its path",
           help="nanochat checkout (recorded on first use)")
parser.add("--arm", default="ours", choices=["ours", "nanochat"], help="which repo trains")
parser.add("--name", default="", help="the arm's name in the report (default: --arm)")
parser.add("--depth", type=int, default=4, min=1)
parser.add("--width", type=int, default=0, min=0, help="n_embd (default: 64 x depth, nanochat's aspect ratio)")
parser.add("--head-dim", type=int, default=64, min=2)
parser.add("--seq-len", type=int, default=256, min=8)
parser.add("--batch-tokens", type=int, default=4096, min=1, help="tokens per optimizer step")
parser.add("--device-batch", type=int, default=16, min=1, help="sequences per forward pass")
parser.add("--steps", type=int, default=200, min=1)
parser.add("--mults", default="0", help="log2 multipliers on every LR of the arm")
parser.add("--seeds", default="0 1 2")
parser.add("--shard", default="0/1", help="run the points j with j %% N == i (i/N)")
parser.add("--doc-chars", type=int, default=600, min=100, help="re-cut documents to at most this many chars")
parser.add("--n-boot", type=int, default=10000, min=1)
argv = sys.argv[1:]
extra = argv[argv.index("--") + 1:] if "--" in argv else []  # the arm's own training options
args = parser.parse_args(argv[:len(argv) - len(extra) - ("--" in argv)])
if not args.out and args.cmd != "check":
    parser.error("--out is required: the A/B directory, e.g. --out runs/ab")

# -----------------------------------------------------------------------------
# data: the demo corpus re-cut into short documents; each repo's tokenizer trained on its train split


def prepare(out, checkout):
    """OUT/data (shards), OUT/tok_ours (this repo's BPE), OUT/nanochat_base (nanochat's base dir: the same
    shards, its own BPE). Idempotent; a lock keeps parallel shards from preparing twice."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from filelock import FileLock

    from nanochat.common import get_base_dir
    from nanochat.dataset import iter_documents, list_shards, split_text

    os.makedirs(out, exist_ok=True)
    with FileLock(os.path.join(out, ".prepare.lock")):
        data = os.path.join(out, "data")
        if not os.path.exists(os.path.join(data, "DONE")):
            shutil.rmtree(data, ignore_errors=True)
            src = os.path.join(get_base_dir(), "data", "shakespeare")
            if len(list_shards(src)) < 2:
                parser.error(f"{src} has no demo corpus: run `python -m nanochat.dataset shakespeare` first")
            tmp = data + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            # the source's own split, each doc re-cut: the val documents stay the val documents
            train = [d for t in iter_documents(src, "train") for d in split_text(t, args.doc_chars)]
            val = [d for t in iter_documents(src, "val") for d in split_text(t, args.doc_chars)]
            shards = [train[i:i + 4000] for i in range(0, len(train), 4000)] + [val]  # the last shard is val
            for i, docs in enumerate(shards):
                pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}),
                               os.path.join(tmp, f"shard_{i:05d}.parquet"), row_group_size=1024)
            atomic_write_text(os.path.join(tmp, "DONE"), json.dumps(dict(train_docs=len(train), val_docs=len(val))))
            os.replace(tmp, data)
        tok = os.path.join(out, "tok_ours")
        if not os.path.exists(os.path.join(tok, "token_bytes.pt")):
            run([sys.executable, os.path.join(ROOT, "scripts", "tok_train.py"), "--vocab-size", "4096",
                 "--data-dir", data, "--out", tok], os.path.join(out, "tok_ours.log"))
        if checkout:
            base = os.path.join(out, "nanochat_base")
            os.makedirs(base, exist_ok=True)
            link = os.path.join(base, "base_data_climbmix")
            if not os.path.islink(link):
                os.symlink(os.path.abspath(data), link)
            if not os.path.exists(os.path.join(base, "tokenizer", "token_bytes.pt")):
                run([sys.executable, "-m", "scripts.tok_train", "--vocab-size", "4096"],
                    os.path.join(out, "tok_nanochat.log"), cwd=checkout, env=dict(NANOCHAT_BASE_DIR=base))


def run(cmd, log, cwd=ROOT, env=None):
    """Run cmd with its output in `log`; a failure stops the A/B naming the log."""
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                           env=dict(os.environ, WANDB_MODE="disabled", **(env or {})))
    if r.returncode != 0:
        sys.exit(f"ab_nanochat.py: `{shlex.join(cmd)}` failed (exit {r.returncode}): see {log}")


# -----------------------------------------------------------------------------
# one grid point: train, score with the shared evaluator, keep only the result


def point(out, checkout, name, mult, seed):
    d = args.depth
    w = args.width or 64 * d
    rd = os.path.join(out, f"{name}_d{d}", f"x{mult:g}_s{seed}")
    result = os.path.join(rd, "result.json")
    if os.path.exists(result):
        return
    shutil.rmtree(rd, ignore_errors=True)  # a killed point restarts from scratch
    os.makedirs(rd)
    from nanochat.dataset import list_shards

    data = os.path.join(out, "data")
    val = list_shards(data)[-1]
    spec = dict(arm=args.arm, name=name, depth=d, width=w, head_dim=args.head_dim, seq_len=args.seq_len,
                batch_tokens=args.batch_tokens, steps=args.steps, mult=mult, seed=seed, extra=extra)
    atomic_write_text(os.path.join(rd, "point.json"), json.dumps(spec, indent=2))
    t0 = time.time()
    if args.arm == "nanochat":
        base = os.path.join(out, "nanochat_base")
        tag = f"{name}_d{d}_x{mult:g}_s{seed}"
        lrs = [a for o, v in NANOCHAT_LRS.items() for a in (o, f"{v * 2 ** mult:.8g}")]
        cmd = [sys.executable, "-c", LAUNCHER, str(seed), "--device-type", "cpu", "--depth", str(d),
               "--aspect-ratio", str(w // d), "--head-dim", str(args.head_dim), "--max-seq-len", str(args.seq_len),
               "--device-batch-size", str(args.device_batch), "--total-batch-size", str(args.batch_tokens),
               "--num-iterations", str(args.steps), "--eval-every", "-1", "--core-metric-every", "-1",
               "--sample-every", "-1", "--model-tag", tag, *lrs, *extra]
        run(cmd, os.path.join(rd, "run.log"), cwd=checkout, env=dict(NANOCHAT_BASE_DIR=base))
        train_s = time.time() - t0
        run([sys.executable, os.path.join(ROOT, "scripts", "ab_eval.py"), "--repo", "nanochat", "--checkout",
             checkout, "--base-dir", base, "--tag", tag, "--val", val, "--out", result + ".tmp"],
            os.path.join(rd, "eval.log"))
        shutil.rmtree(os.path.join(base, "base_checkpoints", tag))
    else:
        from nanochat.transfer import base_values

        base = base_values(extra)
        lrs = [a for o in ("--matrix-lr", "--embedding-lr", "--unembedding-lr", "--scalar-lr")
               for a in (o, f"{base[o] * 2 ** mult:.8g}")]
        train = os.path.join(rd, "train")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "base_train.py"), "--depth", str(d), "--n-embd", str(w),
               "--head-dim", str(args.head_dim), "--sequence-len", str(args.seq_len), "--device-batch-size",
               str(args.device_batch), "--total-batch-size", str(args.batch_tokens), "--num-iterations",
               str(args.steps), "--data-dir", data, "--tokenizer-dir", os.path.join(out, "tok_ours"), "--out-dir",
               train, "--eval-every", "0", "--eval-tokens", "4096", "--device", "cpu", "--dtype", "float32",
               "--compile", "0", "--seed", str(seed), *extra, *lrs]  # the swept LRs last: they win
        run(cmd, os.path.join(rd, "run.log"))
        train_s = time.time() - t0
        run([sys.executable, os.path.join(ROOT, "scripts", "ab_eval.py"), "--repo", "ours", "--run", train,
             "--val", val, "--out", result + ".tmp"], os.path.join(rd, "eval.log"))
        shutil.rmtree(os.path.join(train, "checkpoints"), ignore_errors=True)
    r = json.load(open(result + ".tmp"))
    r.update(spec, train_s=train_s)
    atomic_write_text(result, json.dumps(r, indent=2))
    os.remove(result + ".tmp")
    print(f"{name} d{d} x{mult:g} s{seed}: val bpb {r['bpb']:.4f} ({train_s:.0f} s)", flush=True)


# -----------------------------------------------------------------------------
# check: the two implementations side by side, from nanochat's own init, on the same batches

CHECK_NANOCHAT = """
import sys, torch
torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
sys.path.insert(0, ".")
from nanochat.gpt import GPT, GPTConfig
cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")
torch.manual_seed(0)
with torch.device("meta"):
    model = GPT(cfg)
model.to_empty(device="cpu")
model.init_weights()
init = {k: v.clone() for k, v in model.state_dict().items()}
opt = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28, scalar_lr=0.5)
g = torch.Generator().manual_seed(1)
batches = [(torch.randint(0, 300, (4, 64), generator=g), torch.randint(0, 300, (4, 64), generator=g)) for _ in range(8)]
logits = model(batches[0][0]).detach()
losses = []
for x, y in batches:
    loss = model(x, y)
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    losses.append(loss.item())
torch.save(dict(init=init, batches=batches, logits=logits, losses=losses), sys.argv[1])
"""


def check(checkout):
    """nanochat's GPT + MuonAdamW (its setup_optimizer, momentum 0.95, no schedules) against this repo's SP model at
    the same config and the same optimizer settings (Muon+ renormalisation on, as nanochat has it), loaded with
    nanochat's initial weights: the init logits and 8 steps' losses."""
    import tempfile

    import torch

    from nanochat.gpt import GPTConfig, build_model

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "nanochat.pt")
        run([sys.executable, "-c", CHECK_NANOCHAT, path], os.path.join(tmp, "log"), cwd=checkout)
        ref = torch.load(path)
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=2, n_kv_head=2, n_embd=128, head_impl="eager")
    model = build_model(cfg, "cpu")
    model.load_state_dict(ref["init"], strict=True)  # the same parameter names, shapes and padding
    opt = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28,
                                scalar_lr=0.5, muon_momentum=0.95, muon_renorm=True)  # nanochat's Muon+ step too
    logits = model(ref["batches"][0][0]).detach()
    print(f"init logits: max |ours - nanochat| = {(logits - ref['logits']).abs().max().item():.3g} "
          f"(max |logit| {ref['logits'].abs().max().item():.3g})")
    for i, (x, y) in enumerate(ref["batches"]):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        print(f"step {i}: loss ours {loss.item():.7f} nanochat {ref['losses'][i]:.7f} "
              f"(relative difference {abs(loss.item() / ref['losses'][i] - 1):.2g})")


# -----------------------------------------------------------------------------
# report


def report(out):
    import glob

    import numpy as np

    from nanochat.transfer import ci95

    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*", "*", "result.json")))]
    if not rows:
        parser.error(f"--out={out}: no scored runs (result.json) yet: run `ab_nanochat.py run --out {out} ...`")
    rng = np.random.default_rng(0)
    boot = lambda v: rng.choice(v, (args.n_boot, len(v))).mean(1)
    lines, summary = [f"# A/B against nanochat: val bits per byte ({out})", ""], {}
    for d in sorted({r["depth"] for r in rows}):
        lines += [f"## depth {d}", "", "| arm | log2 LR mult | seeds | mean val bpb | 95% interval | train s/run |",
                  "|---|---|---|---|---|---|"]
        best = {}
        for name in sorted({r["name"] for r in rows if r["depth"] == d}):
            runs = [r for r in rows if r["depth"] == d and r["name"] == name]
            for m in sorted({r["mult"] for r in runs}):
                v = np.array([r["bpb"] for r in runs if r["mult"] == m])
                lo, hi = ci95(boot(v))
                t = np.median([r["train_s"] for r in runs if r["mult"] == m])
                lines.append(f"| {name} | {m:g} | {len(v)} | {v.mean():.4f} | [{lo:.4f}, {hi:.4f}] | {t:.0f} |")
                if len(v) >= 2 and (name not in best or v.mean() < best[name][1].mean()):
                    best[name] = (m, v)
        lines += ["", "Best multiplier per arm (2+ seeds) and the differences of the best means (row - column, 95% "
                  "bootstrap interval, seeds resampled per arm):", ""]
        names = sorted(best)
        for a in names:
            lines.append(f"- {a}: x2^{best[a][0]:g}, {best[a][1].mean():.4f} ({len(best[a][1])} seeds)")
            for b in names:
                if a < b:
                    diff = boot(best[a][1]) - boot(best[b][1])
                    lo, hi = ci95(diff)
                    lines.append(f"  - {a} - {b}: {best[a][1].mean() - best[b][1].mean():+.4f} [{lo:+.4f}, {hi:+.4f}]")
        lines.append("")
        summary[d] = {a: dict(mult=best[a][0], mean=float(best[a][1].mean()), bpb=best[a][1].tolist()) for a in names}
    text = "\n".join(lines)
    atomic_write_text(os.path.join(out, "report.md"), text + "\n")
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(dict(best=summary, runs=rows), indent=2))
    print(text)


# -----------------------------------------------------------------------------

if args.cmd == "report":
    report(args.out)
    sys.exit(0)
if args.cmd == "check":
    if not args.nanochat:
        parser.error("check needs --nanochat PATH (a checkout of karpathy/nanochat)")
    check(os.path.abspath(args.nanochat))
    sys.exit(0)
out = os.path.abspath(args.out)
ab = os.path.join(out, "ab.json")
checkout = os.path.abspath(args.nanochat) if args.nanochat else None
if os.path.exists(ab):
    saved = json.load(open(ab))
    checkout = checkout or saved.get("nanochat")
if args.arm == "nanochat" and not checkout:
    parser.error("--arm nanochat needs --nanochat PATH (a checkout of karpathy/nanochat)")
if (args.width or 64 * args.depth) % args.depth or (args.width or 64 * args.depth) % args.head_dim:
    parser.error(f"--width={args.width}: must be a multiple of --depth and --head-dim")
try:
    mults = [float(x) for x in args.mults.split()]
    seeds = [int(s) for s in args.seeds.split()]
    si, sn = map(int, args.shard.split("/"))
    assert sn >= 1 and 0 <= si < sn and mults and seeds and min(seeds) >= 0
except (ValueError, AssertionError):
    parser.error(f"--mults {args.mults!r} / --seeds {args.seeds!r} / --shard {args.shard!r}: pass numbers, "
                 "non-negative integer seeds and i/N with 0 <= i < N")
prepare(out, checkout)
if checkout:
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    atomic_write_text(ab, json.dumps(dict(nanochat=checkout, nanochat_commit=commit.stdout.strip()), indent=2))
name = args.name or args.arm
jobs = [(m, s) for s in seeds for m in mults]
for j, (m, s) in enumerate(jobs):
    if j % sn == si:
        point(out, checkout, name, m, s)
