"""
Pre-train a GPT, in SP or muP, on one CPU, one GPU or many (torchrun).

    python scripts/base_train.py --depth 4 --mup-base-width 64
    torchrun --standalone --nproc_per_node=2 scripts/base_train.py --mup_base_width 64

Every option accepts both spellings (--mup-base-width and --mup_base_width). Writes to --out-dir:
config.json, metrics.jsonl, checkpoints/step_*/ and loss.png. --resume continues from the latest
complete checkpoint exactly where it stopped (bit-identical on CPU), also on another number of processes
(the optimizer state is re-partitioned and the data streams continue; see dev/distributed.md).

Under torchrun the optimizer is sharded ZeRO-2 style (nanochat.optim.DistMuonAdamW). With --data-streams
the global batch no longer depends on how it is split into ranks and accumulation steps (see dev/distributed.md).

Exit codes: 0 done; 2 bad input (one line on stderr; the options are checked before torch is imported, everything
before anything is written); 3 non-finite loss, gradient, weights after an update, val bpb or sample logits (one
line naming the step; nothing of that step is logged or saved, so the last good checkpoint stays the latest).
"""

import json
import math
import os
import sys
import time

from nanochat.common import ArgParser

# -----------------------------------------------------------------------------
# options: every one is checked here, before torch is imported and before anything is written

parser = ArgParser(description="pre-train a GPT (SP or muP)")
# model
parser.add("--depth", type=int, default=4, min=1, help="number of layers")
parser.add("--aspect-ratio", type=int, default=64, min=1, help="n_embd = depth * aspect_ratio (unless --n-embd)")
parser.add("--head-dim", type=int, default=64, min=1, help="n_head = n_embd / head_dim (unless --n-head)")
parser.add("--n-embd", type=int, default=0, min=0, help="explicit width (0 = from depth and aspect ratio)")
parser.add("--n-head", type=int, default=0, min=0, help="explicit number of heads (0 = from head_dim)")
parser.add("--n-kv-head", type=int, default=0, min=0, help="key/value heads for GQA (0 = n_head)")
parser.add("--sequence-len", type=int, default=256, min=1, help="context length")
parser.add("--window-pattern", default="L", help="per-layer L (full) / S (half context) pattern, tiled")
parser.add("--softcap", type=float, default=15.0, min=0, help="tanh logit softcap (0 = off)")
parser.add("--attn-impl", default="auto", choices=["auto", "triton", "sdpa"], help="auto: Triton on CUDA, else SDPA")
parser.add("--head-impl", default="auto", choices=["auto", "triton", "chunked", "eager"],
           help="lm_head + cross-entropy: auto = fused Triton on CUDA, chunked PyTorch elsewhere")
# muP
parser.add("--mup-base-width", type=int, default=0, min=0, help="muP base width (0 = standard parametrization)")
parser.add("--mup-base-head-dim", type=int, default=0, min=0, help="head_dim the base was tuned at (0 = --head-dim)")
parser.add("--mup-base-n-kv-head", type=int, default=0, min=0,
           help="kv heads of the base (0 = MHA base if this model is MHA, else the same count: fixed kv heads)")
parser.add("--mup-base-depth", type=int, default=0, min=0,
           help="depth the base was tuned at (0 = --depth; another depth needs --depth-alpha)")
parser.add("--depth-alpha", type=float, default=0.0, min=0, max=1,
           help="depth rule: 0 = none, 1 = CompleteP, 0.5 = Depth-muP (branches x (base depth / depth)^alpha)")
parser.add("--attn-mult", type=float, default=0.0, min=0,
           help="muP attention logit scale is attn_mult / head_dim (0 = sqrt(base head_dim): SP at the base width)")
parser.add("--output-mult", type=float, default=1.0, above=0, help="muP logits are multiplied by output_mult / m")
parser.add("--init-scale", type=float, default=1.0, above=0, help="multiplier on every init std (1 = the rules' stds)")
# optimization
parser.add("--matrix-optimizer", default="muon", choices=["muon", "adamw"], help="optimizer for hidden matrices")
parser.add("--matrix-lr", type=float, default=None, min=0, help="hidden-matrix LR (default: muon 0.02, adamw 0.003)")
parser.add("--embedding-lr", type=float, default=0.2, min=0)
parser.add("--unembedding-lr", type=float, default=0.004, min=0)
parser.add("--scalar-lr", type=float, default=0.5, min=0)
parser.add("--weight-decay", type=float, default=0.0, min=0)
parser.add("--device-batch-size", type=int, default=16, min=1, help="sequences per forward pass per process")
parser.add("--total-batch-size", type=int, default=0, min=0,
           help="tokens per optimizer step (0 = one pass per process; on --resume: the checkpoint's)")
parser.add("--num-iterations", type=int, default=200, min=0, help="optimizer steps (unless --target-tokens)")
parser.add("--target-tokens", type=int, default=0, min=0, help="token budget; sets the number of steps when > 0")
parser.add("--warmup-ratio", type=float, default=0.0, min=0, max=1, help="fraction of steps of linear LR warmup")
parser.add("--warmdown-ratio", type=float, default=0.3, min=0, max=1,
           help="fraction of steps of linear LR decay at the end")
parser.add("--final-lr-frac", type=float, default=0.0, min=0, max=1, help="LR at the end as a fraction of the base LR")
# distributed
parser.add("--optimizer-sharding", default="auto", choices=["auto", "on", "off"],
           help="ZeRO-2 sharded optimizer (auto: on under torchrun with >1 process; off: all-reduce + replicated step)")
parser.add("--data-streams", type=int, default=0, min=0,
           help="split each step's batch over this many data streams (0 = one per process; on --resume: the "
                "checkpoint's); the same value gives the same batches for any world size x grad accum split")
# evaluation, sampling, checkpoints, logging
parser.add("--eval-every", type=int, default=100, min=0, help="val bits-per-byte every N steps (0 = only at the end)")
parser.add("--eval-tokens", type=int, default=65536, min=1, help="val tokens per evaluation")
parser.add("--sample-every", type=int, default=0, min=0, help="print samples every N steps (0 = only at the end)")
parser.add("--save-every", type=int, default=0, min=0, help="checkpoint every N steps (0 = only at the end)")
parser.add("--resume", action="store_true", help="continue from the latest complete checkpoint in --out-dir")
parser.add("--run", default="", help="wandb run name (wandb stays disabled without it; offline by default)")
parser.add("--out-dir", default="", path="out", help="run directory (default: runs/<run or 'base'>)")
parser.add("--data-dir", default="", path="dir", fix="run `python -m nanochat.dataset shakespeare` or pass the shards' "
           "directory", help="parquet shards (default: <base dir>/data/shakespeare)")
parser.add("--tokenizer-dir", default="", path="dir", fix="run `python scripts/tok_train.py` or pass its --out",
           help="trained tokenizer (default: <base dir>/tokenizer/default)")
# system
parser.add("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda > mps > cpu")
parser.add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on CUDA, else fp32")
parser.add("--compile", default="auto", choices=["auto", "0", "1"], help="torch.compile (auto: on for CUDA only)")
parser.add("--seed", type=int, default=42, min=0, max=2**63 - 1)
parser.add("--debug-inject-nan-step", type=int, default=0, min=0,
           help="TEST HOOK: make this step (1-based) non-finite to exercise the non-finite guard")
parser.add("--debug-inject-nan-into", default="loss", choices=["loss", "weights"],
           help="TEST HOOK: poison the loss (before the update) or one weight (as if the update overflowed)")
args = parser.parse_args()
if args.warmup_ratio + args.warmdown_ratio > 1:
    parser.error(f"--warmup-ratio={args.warmup_ratio} and --warmdown-ratio={args.warmdown_ratio}: together at most 1")
if not args.window_pattern or set(args.window_pattern) - {"L", "S"}:
    parser.error(f"--window-pattern={args.window_pattern}: use only the letters L and S, e.g. --window-pattern SSL")
out_dir = os.path.abspath(args.out_dir or os.path.join("runs", args.run or "base"))
if not args.out_dir:  # the default path gets the same checks as an explicit one
    parser.check_path("--out-dir", out_dir, "out")

from contextlib import nullcontext  # noqa: E402  (the options are checked first: a bad one fails fast)
from dataclasses import asdict  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nanochat.checkpoint import (  # noqa: E402
    build_model,
    complete_steps,
    load_file,
    load_meta,
    load_optimizer,
    load_stream_states,
    save_main_files,
    save_rank_files,
)
from nanochat.common import atomic_write_text, get_base_dir, get_dist_info  # noqa: E402
from nanochat.dataloader import DataLoader  # noqa: E402
from nanochat.dataset import list_shards, split_shards  # noqa: E402
from nanochat.gpt import GPTConfig  # noqa: E402
from nanochat.loss_eval import evaluate_bpb  # noqa: E402
from nanochat.optim import DistMuonAdamW  # noqa: E402
from nanochat.tokenizer import Tokenizer, get_token_bytes, tokenizer_dir  # noqa: E402

# -----------------------------------------------------------------------------
# compute: device, distributed, precision

ddp, rank, local_rank, world_size = get_dist_info()
if args.device == "auto":
    device_type = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
else:
    device_type = args.device
if device_type == "cuda" and not torch.cuda.is_available():
    parser.error("--device=cuda but no CUDA GPU is visible: use --device cpu")
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
prev = None  # the checkpoint to resume: it fixes the global batch and the data streams unless they are given
if args.resume:
    try:
        prev = load_meta(out_dir)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--resume: {' '.join(str(e).split())}")
tokenizer = Tokenizer.load(tok_dir)
token_bytes = get_token_bytes(tok_dir, device)
B, T = args.device_batch_size, args.sequence_len
tokens_per_pass = B * T * world_size
prev_total = prev and (prev.get("total_batch") or prev["args"]["total_batch_size"]
                       or prev["args"]["device_batch_size"] * prev["args"]["sequence_len"] * prev["world_size"])
total_batch = args.total_batch_size or prev_total or tokens_per_pass
if total_batch % tokens_per_pass:
    rows = total_batch // T
    if total_batch % T or rows % world_size:
        fix = f"pick a multiple of {tokens_per_pass}" if args.total_batch_size else \
            f"use a number of processes that divides its {rows} sequences"
    else:  # the largest device batch <= B that splits this rank's rows evenly
        fix = f"use --device-batch-size {max(d for d in range(1, B + 1) if rows // world_size % d == 0)}"
    what = f"--total-batch-size={total_batch}" if args.total_batch_size else f"the checkpoint's {total_batch} tokens"
    parser.error(f"{what} is not divisible by device_batch_size*sequence_len*world_size = {B}*{T}*{world_size} "
                 f"= {tokens_per_pass}: {fix}")
grad_accum = total_batch // tokens_per_pass
num_steps = math.ceil(args.target_tokens / total_batch) if args.target_tokens else args.num_iterations
if num_steps <= 0:
    parser.error("--num-iterations=0 and no --target-tokens: nothing to train")
# Data streams: a step's global batch is G = total_batch / T rows; stream s of D reads docs[s::D] and yields G / D
# consecutive rows per step. The step's rows are stream 0's, then stream 1's, ... and rank r takes rows
# [r*G/M, (r+1)*G/M) of them, its micro-step k the k-th B of those. So the batch depends on D and G only, never
# on the world size M or the accumulation split: 2 ranks x 1 micro-step and 1 process x 2 micro-steps (D=2)
# take the same optimizer step up to float summation order, and a checkpoint's per-stream states continue on any
# M. A rank runs every stream it has rows from (a stream split between two ranks is read by both).
data_streams = args.data_streams or (prev["data_streams"] if prev else world_size)
rows_per_step, rows_per_rank = total_batch // T, total_batch // T // world_size
if rows_per_step % data_streams:
    parser.error(f"--data-streams={data_streams}: must divide the {rows_per_step} sequences of a step "
                 f"(--total-batch-size / --sequence-len): pick a divisor of {rows_per_step}")
rows_per_stream = rows_per_step // data_streams
my_streams = range(rank * rows_per_rank // rows_per_stream, ((rank + 1) * rows_per_rank - 1) // rows_per_stream + 1)
my_offset = rank * rows_per_rank - my_streams[0] * rows_per_stream  # where this rank's rows start in its streams
owned = [s for s in my_streams if s * rows_per_stream // rows_per_rank == rank]  # saved by this rank
try:
    for split, n in (("train", data_streams), ("val", world_size)):
        rows = [md.row_group(i).num_rows for md in (pq.ParquetFile(p).metadata for p in split_shards(data_dir, split))
                for i in range(md.num_row_groups)]
        if max(rows, default=0) < n:  # the loaders stride each row group's docs over n readers
            parser.error(f"--data-dir={data_dir}: the {split} split has at most {max(rows, default=0)} documents "
                         f"per row group, fewer than its {n} readers: use fewer streams/processes or more data")
    train_loaders = {s: DataLoader(tokenizer, data_dir, rows_per_stream, T, "train", s, data_streams, device,
                                   seed=args.seed) for s in my_streams}
except (OSError, ValueError) as e:  # a corrupt or empty shard (pyarrow's ArrowInvalid is a ValueError)
    parser.error(f"--data-dir={data_dir}: cannot read the shards ({' '.join(str(e).split())})")


def next_rows():
    """This rank's rows_per_rank (x, y) rows of the next step."""
    xs, ys = zip(*(loader.next_batch() for loader in train_loaders.values()))
    x, y = torch.cat(xs), torch.cat(ys)
    return x[my_offset:my_offset + rows_per_rank], y[my_offset:my_offset + rows_per_rank]


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
                       mup_base_n_layer=args.mup_base_depth, depth_alpha=args.depth_alpha,
                       output_mult=args.output_mult, init_scale=args.init_scale, attn_impl=args.attn_impl,
                       head_impl=args.head_impl)
except ValueError as e:
    parser.error(str(e))
# an explicit Triton choice the kernels cannot run fails here, in one line, not at the first forward
if args.attn_impl == "triton":
    import kernels.attention_torch

    if why := kernels.attention_torch.unsupported(device_type, dtype, config.head_dim):
        parser.error(f"--attn-impl=triton cannot run {why}: use --attn-impl sdpa (or auto)")
if args.head_impl == "triton":
    import kernels.head_torch

    if why := kernels.head_torch.unsupported(device_type, dtype):
        parser.error(f"--head-impl=triton cannot run {why}: use --head-impl chunked (or auto)")
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

meta = dict(model_config=asdict(config), args=vars(args), world_size=world_size, data_dir=data_dir,
            tokenizer_dir=os.path.abspath(tok_dir), optimizer_sharded=sharded, data_streams=data_streams,
            total_batch=total_batch,
            # the depth rule's factors (CompleteP; all 1 without it): residual branches, block-matrix LR, scalar LR
            depth_factors=dict(m_L=config.depth_mult, branch_mult=config.branch_mult,
                               matrix_lr=config.depth_mult ** (config.depth_alpha - 1),
                               scalar_lr=1 / config.depth_mult))
metrics_path = os.path.join(out_dir, "metrics.jsonl")
start_step, metrics = 0, []


def check_resumable(prev):
    # the run must be the one the checkpoint continues: same model and data streams (world size, sharding,
    # batch split are free: the state is re-partitioned)
    for k, v in meta["model_config"].items():
        if prev["model_config"].get(k) != v:
            return f"{k}={prev['model_config'].get(k)!r} in the checkpoint but {k}={v!r} in this run"
    if prev["data_streams"] != data_streams:
        return (f"the checkpoint has {prev['data_streams']} data streams, this run --data-streams={data_streams}: "
                "drop --data-streams to continue the checkpoint's")
    return None


if args.resume:
    try:
        if problem := check_resumable(prev):
            parser.error(f"--resume from {out_dir} step {prev['step']}: {problem}")
        model.load_state_dict(load_file(out_dir, prev["step"], "model.pt", device))
        load_optimizer(optimizer, out_dir, prev)
        streams = load_stream_states(out_dir, prev)
        for s, loader in train_loaders.items():
            loader.load_state_dict(streams[s])
        # every rank seeds and draws alike, so a new rank takes rank 0's RNG state
        rng = load_file(out_dir, prev["step"], f"rng_rank{rank if rank < prev['world_size'] else 0}.pt")
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        # RuntimeError/KeyError/TypeError: a readable file whose contents do not fit (load_state_dict)
        parser.error(f"--resume: {' '.join(str(e).split())}")
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and device_type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    start_step = prev["step"]
    if os.path.exists(metrics_path):  # drop metrics logged after the checkpoint: they will be redone
        metrics = [m for m in map(json.loads, open(metrics_path)) if m["step"] <= start_step]
    moved = f" (written by {prev['world_size']} processes, now {world_size})" * (prev["world_size"] != world_size)
    log(f"resumed from step {start_step} in {out_dir}{moved}"
        + (" (already complete)" if start_step >= num_steps else ""))
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
    """Rank 0 prints samples; False (on every rank) when the logits were not finite."""
    ok = True
    if master:
        model.eval()
        for i, prompt in enumerate(("ROMEO:", "To be, or not to be", "The king")):
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            try:
                with autocast:
                    out = model.generate(ids, max_tokens=48, temperature=0.8, top_k=50, seed=args.seed + i)
            except RuntimeError as e:  # torch.multinomial refuses nan/inf probabilities
                if "probability tensor" not in str(e):
                    raise
                ok = False
                break
            log(f"  sample: {tokenizer.decode(ids[1:] + out)!r}")
        model.train()
    if ddp:  # the other ranks must stop with rank 0
        flag = torch.tensor([float(ok)], device=device)
        dist.broadcast(flag, 0)
        ok = bool(flag.item())
    return ok


def params_finite():
    # max |w| per tensor in one fused op: finite iff every weight is (a norm could overflow on finite weights)
    worst = torch.stack(torch._foreach_norm(list(model.parameters()), ord=math.inf)).max().reshape(1)
    if ddp:  # every rank holds the same weights; agreeing explicitly keeps the ranks in lockstep regardless
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return math.isfinite(worst.item())


def stop(step, what):
    """Exit 3 naming the step. Nothing of the step is logged or saved (the bad update lives only in this dying
    process's memory), so the last good checkpoint stays the latest."""
    bar.close()  # the message gets a line of its own
    if master:
        good = complete_steps(out_dir)
        print(f"step {step}: {what}: stopping, nothing of this step is saved; "
              + (f"last good checkpoint: step {good[-1]}" if good else "no checkpoint yet"), file=sys.stderr)
    if ddp:  # every rank stops at the same check; wait for rank 0's line before torchrun sees an exit
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(3)


def save(step):
    save_rank_files(out_dir, step, rank, [train_loaders[s].state_dict() for s in owned],
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
    xs, ys = next_rows()
    for k in range(grad_accum):
        x, y = xs[k * B:(k + 1) * B], ys[k * B:(k + 1) * B]
        with autocast:
            loss = train_model(x, y)
        if step + 1 == args.debug_inject_nan_step and args.debug_inject_nan_into == "loss":
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
        stop(step + 1, f"non-finite loss {train_loss} or gradient norms {grad_norms} before the update")
    try:
        optimizer.step()
    except RuntimeError as e:  # torch refuses an update scalar that overflows float32 (a huge lr / bias correction)
        if "overflow" not in str(e):
            raise
        stop(step + 1, f"the update overflows float32 ({e})")
    model.zero_grad(set_to_none=True)
    if step + 1 == args.debug_inject_nan_step and args.debug_inject_nan_into == "weights":
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    if not params_finite():  # a finite gradient can still overflow the update (a huge LR): the last step too
        stop(step + 1, "non-finite parameters after the update")
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
        if not math.isfinite(row["val_bpb"]):
            stop(step + 1, f"non-finite val bpb {row['val_bpb']}")
        log(f"step {step + 1}: train loss {train_loss:.4f} | val bpb {row['val_bpb']:.4f}")
    bar.set_postfix(postfix)
    log_metrics(row)
    if last or (args.sample_every and (step + 1) % args.sample_every == 0):
        if not sample():
            stop(step + 1, "non-finite logits while sampling")
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
