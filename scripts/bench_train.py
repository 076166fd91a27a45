"""
Training-step throughput on the current device: tokens/s, ms/step and the optimizer's share (gradient sync +
step), median over the steps after warmup, for a fixed small config on random tokens (no data loading).

    python scripts/bench_train.py                 # one process, eager
    python scripts/bench_train.py --compile       # one process, torch.compile
    python scripts/bench_train.py --nproc 2       # 1 process, then 2 via torchrun: sharded and all-reduce

With --nproc N each rank runs the same per-rank batch (weak scaling), so ideal N-process tokens/s is N times
the 1-process figure. Every process runs with OMP_NUM_THREADS=1 (torchrun's default) so 1 and N compare.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from nanochat.common import ArgParser, compute_setup, dist_init, get_dist_info
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import DistMuonAdamW, average_gradients

parser = ArgParser(description="benchmark the training step")
parser.add("--depth", type=int, default=4)
parser.add("--n-embd", type=int, default=256)
parser.add("--vocab-size", type=int, default=8192)
parser.add("--sequence-len", type=int, default=256)
parser.add("--batch-size", type=int, default=8, help="sequences per process per step")
parser.add("--steps", type=int, default=20, help="timed steps (after warmup)")
parser.add("--warmup", type=int, default=5)
parser.add("--compile", action="store_true", help="torch.compile the model")
parser.add("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda > mps > cpu")
parser.add("--nproc", type=int, default=0, help="launch 1 and N processes (torchrun) and print a table")
parser.add("--sharding", default="on", choices=["on", "off"], help="under torchrun: ZeRO-2 optimizer or all-reduce")
args = parser.parse_args()


def launch(nproc, sharding):
    """Run this script as 1 process or under torchrun; returns rank 0's result dict."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    # the worker gets this run's options without --nproc (which torchrun would also take as its own --nproc-per-node)
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("nproc", "compile", "sharding")]
    cmd = [sys.executable, *launcher, os.path.abspath(__file__), *opts, f"--sharding={sharding}"]
    cmd += ["--compile"] if args.compile else []
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("BENCH ")]
    if r.returncode or not lines:
        sys.exit(f"bench_train: {' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1][6:])


def row(name, res):
    return (f"| {name:<26} | {res['tok_per_s']:>10,.0f} | {res['ms_per_step']:>8.1f} | {res['optim_ms']:>9.1f} |")


if args.nproc:
    results = [("1 process", launch(1, "off"))]
    if args.nproc > 1:
        results += [(f"{args.nproc} processes, sharded", launch(args.nproc, "on")),
                    (f"{args.nproc} processes, all-reduce", launch(args.nproc, "off"))]
    print(f"| {'setup':<26} | {'tokens/s':>10} | {'ms/step':>8} | {'optim ms':>9} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 10}|{'-' * 11}|")
    for name, res in results:
        print(row(name, res))
    print(f"device: {results[0][1]['device']}, {results[0][1]['config']}")
    sys.exit(0)

# -----------------------------------------------------------------------------
# one process (or one rank): time the training step

ddp, rank, local_rank, world_size = get_dist_info()
try:
    device, _, autocast = compute_setup(args.device)  # as base_train: bf16 autocast on CUDA, fp32 elsewhere
except ValueError as e:
    parser.error(str(e))
device_type = device.type
if ddp:
    dist_init(device)
sharded = ddp and world_size > 1 and args.sharding == "on"
torch.manual_seed(0)
config = GPTConfig(sequence_len=args.sequence_len, vocab_size=args.vocab_size, n_layer=args.depth,
                   n_head=max(1, args.n_embd // 64), n_kv_head=max(1, args.n_embd // 64), n_embd=args.n_embd)
model = build_model(config, device)
optimizer = model.setup_optimizer()
if sharded:
    optimizer = DistMuonAdamW(optimizer.param_groups, rank, world_size)
train_model = torch.compile(model, dynamic=False) if args.compile else model
B, T = args.batch_size, args.sequence_len
x = torch.randint(0, args.vocab_size, (B, T + 1), device=device)


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


step_ms, optim_ms = [], []
for i in range(args.warmup + args.steps):
    sync()
    t0 = time.perf_counter()
    with autocast:
        loss = train_model(x[:, :-1], x[:, 1:])
    loss.backward()
    sync()
    t1 = time.perf_counter()
    if ddp and not sharded:
        average_gradients(model.parameters())
    optimizer.step()
    model.zero_grad(set_to_none=True)
    sync()
    t2 = time.perf_counter()
    if i >= args.warmup:
        step_ms.append(1000 * (t2 - t0))
        optim_ms.append(1000 * (t2 - t1))
ms = statistics.median(step_ms)
if rank == 0:
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print("BENCH " + json.dumps(dict(
        tok_per_s=B * T * world_size / (ms / 1000), ms_per_step=ms, optim_ms=statistics.median(optim_ms),
        device=name, world_size=world_size, sharded=sharded, compiled=args.compile,
        config=f"depth {args.depth}, n_embd {args.n_embd}, vocab {args.vocab_size}, B {B} x T {T} per process")))
    print(f"{world_size} process(es){' sharded' if sharded else ''}{' compiled' if args.compile else ''}: "
          f"{B * T * world_size / (ms / 1000):,.0f} tokens/s | {ms:.1f} ms/step | "
          f"optimizer {statistics.median(optim_ms):.1f} ms")
if ddp:
    dist.destroy_process_group()
