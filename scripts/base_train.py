"""
Pre-train a GPT, in SP or muP, on one CPU, one GPU or many (torchrun).

    python scripts/base_train.py --depth 4 --mup-base-width 64
    torchrun --standalone --nproc_per_node=2 scripts/base_train.py --mup_base_width 64

Every option accepts both spellings (--mup-base-width and --mup_base_width). Writes to --out-dir:
config.json, metrics.jsonl, checkpoints/step_*/ and loss.png. --resume continues from the latest
complete checkpoint exactly where it stopped (bit-identical on CPU).

Under torchrun the optimizer is sharded ZeRO-2 style (nanochat.optim.DistMuonAdamW). With --data-streams
the global batch no longer depends on how it is split into ranks and accumulation steps (see dev/distributed.md).

Exit codes: 0 done; 2 bad input (one line on stderr, checked before anything is written); 3 non-finite loss
or gradient (the bad step is not applied or saved; the last good checkpoint stays the latest).
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.checkpoint import (
    build_model,
    complete_steps,
    load_file,
    load_meta,
    optim_file,
    save_main_files,
    save_rank_files,
)
from nanochat.common import ArgParser, atomic_write_text, get_base_dir, get_dist_info
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_shards, split_shards
from nanochat.gpt import GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import DistMuonAdamW
from nanochat.tokenizer import Tokenizer, get_token_bytes, tokenizer_dir

# -----------------------------------------------------------------------------
# options

parser = ArgParser(description="pre-train a GPT (SP or muP)")
# model
parser.add("--depth", type=int, default=4, help="number of layers")
parser.add("--aspect-ratio", type=int, default=64, help="n_embd = depth * aspect_ratio (unless --n-embd)")
parser.add("--head-dim", type=int, default=64, help="n_head = n_embd / head_dim (unless --n-head)")
parser.add("--n-embd", type=int, default=0, help="explicit width (0 = from depth and aspect ratio)")
parser.add("--n-head", type=int, default=0, help="explicit number of heads (0 = from head_dim)")
parser.add("--n-kv-head", type=int, default=0, help="key/value heads for GQA (0 = n_head)")
parser.add("--sequence-len", type=int, default=256, help="context length")
parser.add("--window-pattern", default="L", help="per-layer L (full) / S (half context) pattern, tiled")
parser.add("--softcap", type=float, default=15.0, help="tanh logit softcap (0 = off)")
parser.add("--attn-impl", default="auto", choices=["auto", "triton", "sdpa"], help="auto: Triton on CUDA, else SDPA")
parser.add("--head-impl", default="auto", choices=["auto", "triton", "chunked", "eager"],
           help="lm_head + cross-entropy: auto = fused Triton on CUDA, chunked PyTorch elsewhere")
# muP
parser.add("--mup-base-width", type=int, default=0, help="muP base width (0 = standard parametrization)")
parser.add("--mup-base-head-dim", type=int, default=0, help="head_dim the base was tuned at (0 = --head-dim)")
parser.add("--mup-base-n-kv-head", type=int, default=0,
           help="kv heads of the base (0 = MHA base if this model is MHA, else the same count: fixed kv heads)")
parser.add("--mup-base-depth", type=int, default=0, help="depth the base was tuned at (0 = --depth; must match)")
parser.add("--attn-mult", type=float, default=0.0,
           help="muP attention logit scale is attn_mult / head_dim (0 = sqrt(base head_dim): SP at the base width)")
parser.add("--output-mult", type=float, default=1.0, help="muP logits are multiplied by output_mult / m")
# optimization
parser.add("--matrix-optimizer", default="muon", choices=["muon", "adamw"], help="optimizer for hidden matrices")
parser.add("--matrix-lr", type=float, default=None, help="hidden-matrix LR (default: muon 0.02, adamw 0.003)")
parser.add("--embedding-lr", type=float, default=0.2)
parser.add("--unembedding-lr", type=float, default=0.004)
parser.add("--scalar-lr", type=float, default=0.5)
parser.add("--weight-decay", type=float, default=0.0)
parser.add("--device-batch-size", type=int, default=16, help="sequences per forward pass per process")
parser.add("--total-batch-size", type=int, default=0, help="tokens per optimizer step (0 = one pass per process)")
parser.add("--num-iterations", type=int, default=200, help="optimizer steps (unless --target-tokens)")
parser.add("--target-tokens", type=int, default=0, help="token budget; sets the number of steps when > 0")
parser.add("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warmup")
parser.add("--warmdown-ratio", type=float, default=0.3, help="fraction of steps of linear LR decay at the end")
parser.add("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the base LR")
# distributed
parser.add("--optimizer-sharding", default="auto", choices=["auto", "on", "off"],
           help="ZeRO-2 sharded optimizer (auto: on under torchrun with >1 process; off: all-reduce + replicated step)")
parser.add("--data-streams", type=int, default=0,
           help="split each step's batch over this many data streams (0 = one per process); the same value "
                "gives the same batches for any world size x grad accum split of --total-batch-size")
# evaluation, sampling, checkpoints, logging
parser.add("--eval-every", type=int, default=100, help="val bits-per-byte every N steps (0 = only at the end)")
parser.add("--eval-tokens", type=int, default=65536, help="val tokens per evaluation")
parser.add("--sample-every", type=int, default=0, help="print samples every N steps (0 = only at the end)")
parser.add("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
parser.add("--resume", action="store_true", help="continue from the latest complete checkpoint in --out-dir")
parser.add("--run", default="", help="wandb run name (wandb stays disabled without it; offline by default)")
parser.add("--out-dir", default="", help="run directory (default: runs/<run or 'base'>)")
parser.add("--data-dir", default="", help="parquet shards (default: <base dir>/data/shakespeare)")
parser.add("--tokenizer-dir", default="", help="trained tokenizer (default: <base dir>/tokenizer/default)")
# system
parser.add("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
parser.add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on CUDA, else fp32")
parser.add("--compile", default="auto", choices=["auto", "0", "1"], help="torch.compile (auto: on for CUDA only)")
parser.add("--seed", type=int, default=42)
parser.add("--debug-inject-nan-step", type=int, default=0,
           help="TEST HOOK: multiply the loss by NaN at this step (1-based) to exercise the non-finite guard")
args = parser.parse_args()

for name in ("depth", "aspect_ratio", "head_dim", "sequence_len", "device_batch_size", "eval_tokens"):
    if getattr(args, name) <= 0:
        parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
for name in ("num_iterations", "n_embd", "n_head", "n_kv_head", "total_batch_size", "target_tokens", "eval_every",
             "sample_every", "save_every", "data_streams", "debug_inject_nan_step"):
    if getattr(args, name) < 0:
        parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must not be negative")
if not 0 <= args.warmup_ratio + args.warmdown_ratio <= 1 or min(args.warmup_ratio, args.warmdown_ratio) < 0:
    parser.error(f"--warmup-ratio={args.warmup_ratio} and --warmdown-ratio={args.warmdown_ratio}: "
                 "each in [0, 1] and together at most 1")

# -----------------------------------------------------------------------------
# compute: device, distributed, precision

ddp, rank, local_rank, world_size = get_dist_info()
if args.device == "auto":
    device_type = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
else:
    device_type = args.device
if device_type not in ("cuda", "mps", "cpu"):
    parser.error(f"--device={args.device}: choose auto, cuda, mps or cpu")
if device_type == "cuda" and not torch.cuda.is_available():
    parser.error("--device=cuda but no CUDA GPU is visible: use --device cpu")
for opt in ("attn_impl", "head_impl"):
    if getattr(args, opt) == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error(f"--{opt.replace('_', '-')}=triton needs a CUDA GPU (device is {device_type}): use auto")
device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else device_type)
if device_type == "cuda":
    torch.cuda.set_device(device)
sharded = args.optimizer_sharding == "on" or (args.optimizer_sharding == "auto" and world_size > 1)
if sharded and world_size == 1:
    parser.error("--optimizer-sharding=on needs more than one process: launch with torchrun --nproc_per_node=N")
master = rank == 0
torch.manual_seed(args.seed)
torch.set_float32_matmul_precision("high")
dtype = {"auto": torch.bfloat16 if device_type == "cuda" else torch.float32,
         "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
use_compile = args.compile == "1" or (args.compile == "auto" and device_type == "cuda")


def log(*a):
    if master:
        tqdm.write(" ".join(str(x) for x in a))


# -----------------------------------------------------------------------------
# data and tokenizer

data_dir = os.path.abspath(args.data_dir or os.path.join(get_base_dir(), "data", "shakespeare"))
tok_dir = args.tokenizer_dir or tokenizer_dir()
if len(list_shards(data_dir)) < 2:
    parser.error(f"--data-dir={data_dir} has fewer than 2 shards: run `python -m nanochat.dataset shakespeare`")
if not os.path.exists(os.path.join(tok_dir, "token_bytes.pt")):
    parser.error(f"--tokenizer-dir={tok_dir} holds no trained tokenizer: run `python scripts/tok_train.py`")
tokenizer = Tokenizer.load(tok_dir)
token_bytes = get_token_bytes(tok_dir, device)
B, T = args.device_batch_size, args.sequence_len
tokens_per_pass = B * T * world_size
total_batch = args.total_batch_size or tokens_per_pass
if total_batch % tokens_per_pass:
    parser.error(f"--total-batch-size={total_batch} is not divisible by device_batch_size*sequence_len*world_size "
                 f"= {B}*{T}*{world_size} = {tokens_per_pass}: pick a multiple of {tokens_per_pass}")
grad_accum = total_batch // tokens_per_pass
num_steps = math.ceil(args.target_tokens / total_batch) if args.target_tokens else args.num_iterations
if num_steps <= 0:
    parser.error("--num-iterations=0 and no --target-tokens: nothing to train")
# Data streams: stream s of D reads docs[s::D]; rank r serves streams r*S .. r*S+S-1 (S = D / world) and its
# micro-step k draws from stream r*S + k % S. Each step then uses every stream grad_accum / S times whatever
# the split of D into processes, so e.g. 2 ranks x 1 micro-step and 1 process x 2 micro-steps (D=2) see the
# same global batch and take the same optimizer step, up to float summation order.
data_streams = args.data_streams or world_size
if data_streams % world_size or grad_accum % (data_streams // world_size):
    parser.error(f"--data-streams={data_streams}: must be a multiple of the world size {world_size} and "
                 f"(data_streams / world size) must divide the {grad_accum} gradient-accumulation steps")
streams_per_rank = data_streams // world_size
try:
    for split, n in (("train", data_streams), ("val", world_size)):
        rows = [md.row_group(i).num_rows for md in (pq.ParquetFile(p).metadata for p in split_shards(data_dir, split))
                for i in range(md.num_row_groups)]
        if max(rows, default=0) < n:  # the loaders stride each row group's docs over n readers
            parser.error(f"--data-dir={data_dir}: the {split} split has at most {max(rows, default=0)} documents "
                         f"per row group, fewer than its {n} readers: use fewer streams/processes or more data")
    train_loaders = [DataLoader(tokenizer, data_dir, B, T, "train", s, data_streams, device, seed=args.seed)
                     for s in range(rank * streams_per_rank, (rank + 1) * streams_per_rank)]
except (OSError, ValueError) as e:  # a corrupt or empty shard (pyarrow's ArrowInvalid is a ValueError)
    parser.error(f"--data-dir={data_dir}: cannot read the shards ({' '.join(str(e).split())})")
eval_steps = max(1, args.eval_tokens // tokens_per_pass)

# -----------------------------------------------------------------------------
# model and optimizer

n_embd = args.n_embd or args.depth * args.aspect_ratio
n_head = args.n_head or max(1, n_embd // args.head_dim)
try:
    config = GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth, n_head=n_head,
                       n_kv_head=args.n_kv_head or n_head, n_embd=n_embd, window_pattern=args.window_pattern,
                       softcap=args.softcap, mup_base_width=args.mup_base_width, attn_mult=args.attn_mult,
                       mup_base_head_dim=args.mup_base_head_dim, mup_base_n_kv_head=args.mup_base_n_kv_head,
                       mup_base_n_layer=args.mup_base_depth,
                       output_mult=args.output_mult, attn_impl=args.attn_impl,
                       head_impl=args.head_impl)
except ValueError as e:
    parser.error(str(e))
model = build_model(config, device)
opt_kwargs = dict(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                  weight_decay=args.weight_decay, scalar_lr=args.scalar_lr, matrix_optimizer=args.matrix_optimizer)
optimizer = model.setup_optimizer(**opt_kwargs)
if sharded:  # same groups, ZeRO-2 step: reduce-scatters the raw local gradients itself
    optimizer = DistMuonAdamW(optimizer.param_groups, rank, world_size)
if master:
    model.mup_table(print_table=True, **opt_kwargs)
train_model = torch.compile(model, dynamic=False) if use_compile else model


def lr_mult(step):
    warmup, warmdown = round(args.warmup_ratio * num_steps), round(args.warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_steps - warmdown:
        return 1.0
    frac = (num_steps - step) / warmdown
    return frac + (1 - frac) * args.final_lr_frac


# -----------------------------------------------------------------------------
# run directory, resume, logging

out_dir = os.path.abspath(args.out_dir or os.path.join("runs", args.run or "base"))
meta = dict(model_config=asdict(config), args=vars(args), world_size=world_size, data_dir=data_dir,
            tokenizer_dir=os.path.abspath(tok_dir), optimizer_sharded=sharded, data_streams=data_streams)
metrics_path = os.path.join(out_dir, "metrics.jsonl")
start_step, metrics = 0, []


def check_resumable(prev):
    # the run must be the one the checkpoint continues: same model, same split into ranks and streams
    for k, v in meta["model_config"].items():
        if prev["model_config"].get(k) != v:
            return f"{k}={prev['model_config'].get(k)!r} in the checkpoint but {k}={v!r} in this run"
    for k in ("world_size", "optimizer_sharded", "data_streams"):
        if prev.get(k) != meta[k]:
            return f"the checkpoint has {k}={prev.get(k)!r}, this run {k}={meta[k]!r}: resume with the same setup"
    return None


if args.resume:
    try:
        prev = load_meta(out_dir)
        if problem := check_resumable(prev):
            parser.error(f"--resume from {out_dir} step {prev['step']}: {problem}")
        model.load_state_dict(load_file(out_dir, prev["step"], "model.pt", device))
        optimizer.load_state_dict(load_file(out_dir, prev["step"], optim_file(rank, sharded), device))
        for loader, state in zip(train_loaders, load_file(out_dir, prev["step"], f"loader_rank{rank}.pt"), strict=True):
            loader.load_state_dict(state)
        rng = load_file(out_dir, prev["step"], f"rng_rank{rank}.pt")
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        # RuntimeError/KeyError/TypeError: a readable file whose contents do not fit (load_state_dict)
        parser.error(f"--resume: {' '.join(str(e).split())}")
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and device_type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    start_step = prev["step"]
    if os.path.exists(metrics_path):  # drop metrics logged after the checkpoint: they will be redone
        metrics = [m for m in map(json.loads, open(metrics_path)) if m["step"] <= start_step]
    log(f"resumed from step {start_step} in {out_dir}" + (" (already complete)" if start_step >= num_steps else ""))
elif complete_steps(out_dir):
    parser.error(f"--out-dir={out_dir} already holds checkpoints: pass --resume or pick another --out-dir")
# every input is checked: only now join the other ranks and write anything
if ddp:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
if master:
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(meta, indent=2))
    atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))

wandb_run = None
if args.run and master:
    import wandb  # only when asked for: never online unless the user sets WANDB_MODE=online

    wandb_run = wandb.init(project="nanochat-mup", name=args.run, dir=out_dir, config=meta,
                           mode=os.environ.get("WANDB_MODE", "offline"))


def log_metrics(row):
    metrics.append(row)
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb_run is not None:
            wandb_run.log(row, step=row["step"])


def evaluate():
    model.eval()
    loader = DataLoader(tokenizer, data_dir, B, T, "val", rank, world_size, device)
    with autocast:
        bpb = evaluate_bpb(model, loader, eval_steps, token_bytes)
    model.train()
    return bpb


def sample():
    if not master:
        return
    model.eval()
    for i, prompt in enumerate(("ROMEO:", "To be, or not to be", "The king")):
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast:
            out = model.generate(ids, max_tokens=48, temperature=0.8, top_k=50, seed=args.seed + i)
        log(f"  sample: {tokenizer.decode(ids[1:] + out)!r}")
    model.train()


def save(step):
    save_rank_files(out_dir, step, rank, [loader.state_dict() for loader in train_loaders],
                    dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device_type == "cuda" else None),
                    optimizer.state_dict() if sharded else None)
    if ddp:
        dist.barrier()  # every rank's files are on disk before rank 0 marks the checkpoint complete
    if master:
        save_main_files(out_dir, step, model, None if sharded else optimizer.state_dict(), meta)
    if ddp:
        dist.barrier()


# -----------------------------------------------------------------------------
# training loop

log(f"{sum(p.numel() for p in model.parameters()):,} params | {num_steps} steps x {total_batch:,} tokens "
    f"(grad accum {grad_accum}, world {world_size}) | {device_type} {str(dtype).split('.')[-1]}"
    f"{' compiled' if use_compile else ''} | out {out_dir}")
flops_per_token = model.num_flops_per_token()
peak_flops = 989e12 if device_type == "cuda" else None  # H100 bf16 dense; MFU is only shown on CUDA
bar = tqdm(range(start_step, num_steps), initial=start_step, total=num_steps, disable=not master, dynamic_ncols=True)
t_last = time.time()
for step in bar:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_mult(step)
    loss_sum = torch.zeros((), device=device)
    for k in range(grad_accum):
        x, y = train_loaders[k % streams_per_rank].next_batch()
        with autocast:
            loss = train_model(x, y)
        if step + 1 == args.debug_inject_nan_step:
            loss = loss * float("nan")
        (loss / grad_accum).backward()
        loss_sum += loss.detach()
    if ddp and not sharded:  # average gradients across ranks (what DDP does), one async all-reduce per parameter
        works = [dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True) for p in model.parameters()]
        for w in works:
            w.wait()
    # non-finite guard, decided jointly: any rank's nan/inf loss or local gradient makes the average non-finite
    grad_norms = torch.stack(torch._foreach_norm([p.grad for p in model.parameters()])).sum()  # no squares: no overflow
    health = torch.stack([loss_sum / grad_accum, grad_norms])
    if ddp:
        dist.all_reduce(health, op=dist.ReduceOp.AVG)
    train_loss, grad_norms = health.tolist()
    if not math.isfinite(train_loss + grad_norms):
        bar.close()  # the message gets a line of its own
        if master:
            print(f"step {step + 1}: non-finite loss {train_loss} or gradient norms {grad_norms}: stopping before the "
                  f"update; last good checkpoint: step {(complete_steps(out_dir) or [None])[-1]}", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        sys.exit(3)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    dt, t_last = time.time() - t_last, time.time()
    tok_per_s = total_batch / dt
    row = dict(step=step + 1, train_loss=train_loss, lr_mult=lr_mult(step), tok_per_s=tok_per_s, dt=dt)
    postfix = dict(loss=f"{train_loss:.3f}", tok_s=f"{tok_per_s:,.0f}")
    if peak_flops:
        row["mfu"] = flops_per_token * tok_per_s / (peak_flops * world_size)
        postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
    last = step + 1 == num_steps
    if last or (args.eval_every and (step + 1) % args.eval_every == 0):
        row["val_bpb"] = evaluate()
        log(f"step {step + 1}: train loss {train_loss:.4f} | val bpb {row['val_bpb']:.4f}")
    bar.set_postfix(postfix)
    log_metrics(row)
    if last or (args.sample_every and (step + 1) % args.sample_every == 0):
        sample()
    if last or (args.save_every and (step + 1) % args.save_every == 0):
        save(step + 1)
    t_last = time.time()  # eval, sampling and saving do not count against throughput
bar.close()
if ddp:  # every rank must hold the same weights: compare a checksum of all parameters
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(sums, checksum)
    if len({s.item() for s in sums}) != 1:
        raise RuntimeError(f"ranks diverged: parameter checksums {[s.item() for s in sums]}")
    log(f"all {world_size} ranks hold identical parameters (checksum {checksum.item():.10g})")

# -----------------------------------------------------------------------------
# summary and plot

if master and metrics:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5), dpi=80)
    ax[0].plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics])
    ax[0].set(xlabel="step", ylabel="train loss (nats/token)", title=os.path.basename(out_dir))
    evals = [m for m in metrics if "val_bpb" in m]
    ax[1].plot([m["step"] for m in evals], [m["val_bpb"] for m in evals], marker="o")
    ax[1].set(xlabel="step", ylabel="val bits per byte")
    fig.tight_layout()
    plot_path = os.path.join(out_dir, "loss.png")
    fig.savefig(plot_path)
    final = metrics[-1]
    log(f"done: val bpb {final.get('val_bpb', float('nan')):.4f} | train loss {final['train_loss']:.4f} | "
        f"plot {plot_path}")
if wandb_run is not None:
    wandb_run.finish()
if ddp:
    dist.destroy_process_group()
