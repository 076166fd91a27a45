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

import importlib.util
import math
import os
import re
import sys
import time
from dataclasses import asdict, fields, replace

from nanochat.common import ArgParser
from nanochat.config import MATRIX_LR, GPTConfig, OptimConfig

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
gpt_fields = {f.name: f.default for f in fields(GPTConfig)}  # the model's defaults: nanochat/config.py
parser.add("--window-pattern", default=gpt_fields["window_pattern"],
           help="per-layer L (full) / S (short window) pattern, tiled; the last layer is always L")
parser.add("--short-window", type=int, default=gpt_fields["short_window"], min=0,
           help="S layers' window in tokens (0 = a quarter of the context, rounded up to 128-token tiles)")
parser.add("--softcap", type=float, default=gpt_fields["softcap"], min=0, help="tanh logit softcap (0 = off)")
# nanochat master's model features: 1 = on (its default), 0 = off
for name, what in (("value_embeds", "gated value embeddings on alternating layers"),
                   ("smear", "smear gate: the previous token's embedding mixed in"),
                   ("backout", "subtract a learned fraction of the middle layer's residual before the readout")):
    parser.add("--" + name.replace("_", "-"), type=int, default=int(gpt_fields[name]), choices=[0, 1], help=what)
parser.add("--scalar-init", default=gpt_fields["scalar_init"], choices=["ramp", "flat"],
           help="resid/x0_lambdas init: ramp 1.15->1.05 and 0.20->0.05 over the layers, or flat 1 and 0")
parser.add("--qk-gain", type=float, default=gpt_fields["qk_gain"], above=0, help="q and k multiplier after QK-norm")
parser.add("--fc-init", type=float, default=gpt_fields["fc_init"], above=0, help="c_fc init std multiplier")
parser.add("--embed-std", type=float, default=gpt_fields["embed_std"], above=0, help="token embedding init std")
parser.add("--rope-base", type=float, default=gpt_fields["rope_base"], above=0, help="rotary base")
parser.add("--pad-vocab-to", type=int, default=gpt_fields["pad_vocab_to"], min=1,
           help="embedding and lm_head rows rounded up to a multiple of this (1 = no padding)")
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
hp_fields = {f.name: f for f in fields(OptimConfig)}  # defaults and help: nanochat/config.py
parser.add("--matrix-optimizer", default=hp_fields["matrix_optimizer"].default, choices=list(MATRIX_LR),
           help=hp_fields["matrix_optimizer"].metadata["help"])
HP_OPTIONS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "gate_lr", "weight_decay")
for name in HP_OPTIONS:
    parser.add("--" + name.replace("_", "-"), type=float, default=hp_fields[name].default, min=0,
               help=hp_fields[name].metadata["help"])
# Muon's additions and the schedules (nanochat's defaults; OptimConfig documents each)
SCHEDULE_OPTIONS = dict(normuon_beta2=(float, "NorMuon second-moment EMA (0 = off)"),
                        muon_eq=(int, "MuonEq row equilibration (1 = on)"),
                        muon_renorm=(int, "Muon+ Frobenius renormalisation (1 = on)"),
                        cautious_wd=(int, "cautious weight decay on Muon (1 = on)"),
                        warmup_steps=(int, "LR warmup steps"),
                        warmdown_ratio=(float, "fraction of the steps of linear LR decay at the end"),
                        final_lr_frac=(float, "LR at the end as a fraction of the peak"),
                        muon_momentum=(float, "Muon momentum after its warmup"),
                        momentum_start=(float, "Muon momentum at step 0"),
                        momentum_warmup=(int, "steps of the momentum warmup"),
                        momentum_end=(float, "Muon momentum at the end of the LR warmdown"))
for name, (kind, what) in SCHEDULE_OPTIONS.items():
    flag, default = "--" + name.replace("_", "-"), hp_fields[name].default
    if kind is int and isinstance(default, bool):
        parser.add(flag, type=int, default=int(default), choices=[0, 1], help=what)
    elif kind is int:
        parser.add(flag, type=int, default=default, min=0, help=what)
    else:
        parser.add(flag, type=float, default=default, min=0, max=1, help=what)
parser.add("--wd-schedule", default=hp_fields["wd_schedule"].default, choices=["cosine", "constant"],
           help=hp_fields["wd_schedule"].metadata["help"])
parser.add("--device-batch-size", type=int, default=16, min=1, help="sequences per forward pass per process")
parser.add("--total-batch-size", default="0",
           help="tokens per optimizer step (0 = one pass per process; on --resume: the checkpoint's; auto or -1: "
                "Power Lines' batch for the horizon, from the reference below, else nanochat's depth-12 point)")
parser.add("--num-iterations", type=int, default=200, min=0, help="optimizer steps (unless a horizon below is set)")
parser.add("--target-tokens", type=int, default=0, min=0, help="token budget; sets the number of steps when > 0")
parser.add("--target-param-data-ratio", type=float, default=0, min=0,
           help="token budget as this many tokens per scaling parameter (blocks' matrices + lm_head; 0 = off)")
parser.add("--target-flops", type=float, default=0, min=0,
           help="token budget as a FLOP budget / FLOPs per token (nanochat's count; 0 = off)")
# batch and horizon transfer (nanochat/scaling.py): the shape the LRs and weight decay were tuned at
parser.add("--ref-batch-size", type=int, default=0, min=0,
           help="tokens per step of the run the hyperparameters were tuned at (0 = this run's: no batch rule)")
parser.add("--ref-tokens", type=int, default=0, min=0,
           help="training tokens of the run the hyperparameters were tuned at (0 = this run's: no horizon rule)")
parser.add("--batch-lr-scaling", type=float, default=0.5, min=0,
           help="every LR x (batch / ref batch)^this (0 = off)")
parser.add("--wd-scaling", type=int, default=1, choices=[0, 1],
           help="weight decay x (B/B_ref)(D_ref/D) / LR factor: holds the decay timescale's share of the run (0 = off)")
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
if args.total_batch_size == "auto":
    args.total_batch_size = "-1"
if not re.fullmatch(r"-1|\d+", args.total_batch_size):
    parser.error(f"--total-batch-size={args.total_batch_size}: pass a number of tokens, 0 (one pass) or auto")
args.total_batch_size = int(args.total_batch_size)
if bool(args.ref_batch_size) != bool(args.ref_tokens):
    given, missing = ("--ref-batch-size", "--ref-tokens")[::1 if args.ref_batch_size else -1]
    parser.error(f"{given} without {missing}: the reference is a run's batch and its tokens, pass both")
if not args.window_pattern or set(args.window_pattern) - {"L", "S"}:
    parser.error(f"--window-pattern={args.window_pattern}: use only the letters L and S, e.g. --window-pattern SSL")
out_dir = os.path.abspath(args.out_dir or os.path.join("runs", args.run or "base"))
if not args.out_dir:  # the default path gets the same checks as an explicit one
    parser.check_path("--out-dir", out_dir, "out")
if args.run and importlib.util.find_spec("wandb") is None:
    parser.error(f"--run={args.run} logs to wandb, which is not installed: pip install wandb, or drop --run")

import torch  # noqa: E402  (the options are checked first: a bad one fails fast)
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nanochat.checkpoint import (  # noqa: E402
    complete_steps,
    load_meta,
    load_training_state,
    resume_problem,
    save_checkpoint,
    shared_dir_problem,
    total_batch_of,
)
from nanochat.common import compute_setup, dist_init, get_base_dir, get_dist_info, peak_bf16_flops  # noqa: E402
from nanochat.dataloader import DataLoader, StepBatches, global_batch  # noqa: E402
from nanochat.dataset import list_shards, max_docs_per_row_group  # noqa: E402
from nanochat.engine import sample_texts  # noqa: E402
from nanochat.gpt import GPTConfig, build_model  # noqa: E402
from nanochat.health import LateChecks, weights_max  # noqa: E402
from nanochat.kernel_choice import agree_across_ranks, choose_kernels  # noqa: E402
from nanochat.loss_eval import evaluate_bpb  # noqa: E402
from nanochat.optim import DistMuonAdamW, average_gradients, replica_checksum  # noqa: E402
from nanochat.report import RunLog, plot_losses, print_role_table  # noqa: E402
from nanochat.scaling import (  # noqa: E402
    NANOCHAT_REF_BATCH,
    NANOCHAT_REF_DEPTH,
    NANOCHAT_REF_RATIO,
    auto_batch,
    describe,
    factors,
    horizon,
)
from nanochat.tokenizer import Tokenizer, get_token_bytes, tokenizer_dir  # noqa: E402

# -----------------------------------------------------------------------------
# compute: device, distributed, precision

ddp, rank, local_rank, world_size = get_dist_info()
try:
    device, dtype, autocast = compute_setup(args.device, args.dtype)
except ValueError as e:
    parser.error(str(e))
device_type = device.type
sharded = args.optimizer_sharding == "on" or (args.optimizer_sharding == "auto" and world_size > 1)
if sharded and world_size == 1:
    parser.error("--optimizer-sharding=on needs more than one process: launch with torchrun --nproc_per_node=N")
master = rank == 0
torch.manual_seed(args.seed)
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

# -----------------------------------------------------------------------------
# model config (the horizon and batch rules below count its parameters)

n_embd = args.n_embd or args.depth * args.aspect_ratio
n_head = args.n_head or max(1, n_embd // args.head_dim)
try:
    config = GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth, n_head=n_head,
                       n_kv_head=args.n_kv_head or n_head, n_embd=n_embd, window_pattern=args.window_pattern,
                       softcap=args.softcap, mup_base_width=args.mup_base_width, attn_mult=args.attn_mult,
                       mup_base_head_dim=args.mup_base_head_dim, mup_base_n_kv_head=args.mup_base_n_kv_head,
                       mup_base_n_layer=args.mup_base_depth, depth_alpha=args.depth_alpha,
                       output_mult=args.output_mult, init_scale=args.init_scale, attn_impl=args.attn_impl,
                       head_impl=args.head_impl, short_window=args.short_window, value_embeds=bool(args.value_embeds),
                       smear=bool(args.smear), backout=bool(args.backout), scalar_init=args.scalar_init,
                       qk_gain=args.qk_gain, fc_init=args.fc_init, embed_std=args.embed_std, rope_base=args.rope_base,
                       pad_vocab_to=args.pad_vocab_to)
except ValueError as e:  # the message names GPTConfig fields: name the options instead
    option = lambda m: {"n_layer": "--depth", "mup_base_n_layer": "--mup-base-depth"}.get(  # noqa: E731
        m.group(1), "--" + m.group(1).replace("_", "-"))
    parser.error(re.sub(r"GPTConfig\.(\w+)", option, str(e)))

# -----------------------------------------------------------------------------
# horizon, batch, and the batch / horizon rules (nanochat/scaling.py)

shape = build_model(config, "meta")  # the counts only
n_scaling, flops_per_token = shape.num_scaling_params(), shape.num_flops_per_token()
try:
    tokens = horizon(args.target_tokens, args.target_param_data_ratio, args.target_flops, n_scaling, flops_per_token)
except ValueError as e:
    parser.error(str(e))
total_batch_size, batch_rule = args.total_batch_size, None
if total_batch_size == -1 and prev:
    total_batch_size = 0  # the checkpoint's
elif total_batch_size == -1:
    if not tokens:
        parser.error("--total-batch-size=auto needs a horizon in tokens: pass --target-tokens, "
                     "--target-param-data-ratio or --target-flops")
    if args.ref_batch_size:
        ref_b, ref_t, where = args.ref_batch_size, args.ref_tokens, "the reference run"
    else:  # nanochat's depth-12 model at this vocab and context
        d12 = GPTConfig(sequence_len=T, vocab_size=config.vocab_size, n_layer=NANOCHAT_REF_DEPTH, n_head=12,
                        n_kv_head=12, n_embd=768)
        ref_b, where = NANOCHAT_REF_BATCH, "nanochat's depth-12 point"
        ref_t = NANOCHAT_REF_RATIO * build_model(d12, "meta").num_scaling_params()
    total_batch_size = auto_batch(tokens, ref_b, ref_t)
    batch_rule = (f"auto batch {total_batch_size:,} = 2^round(log2({ref_b:,} x ({tokens:,} / {ref_t:,})^0.383)) "
                  f"from {where} (Power Lines)")
try:
    total_batch = global_batch(B, T, world_size, total_batch_size, prev and total_batch_of(prev))
except ValueError as e:
    parser.error(str(e))
grad_accum = total_batch // tokens_per_pass
num_steps = math.ceil(tokens / total_batch) if tokens else args.num_iterations
if num_steps <= 0:
    parser.error("--num-iterations=0 and no horizon (--target-tokens, --target-param-data-ratio, --target-flops): "
                 "nothing to train")
trained = num_steps * total_batch
ref_batch, ref_tokens = args.ref_batch_size or total_batch, args.ref_tokens or trained
scale = factors(total_batch, trained, ref_batch, ref_tokens, args.batch_lr_scaling, bool(args.wd_scaling))
scaling = dict(tokens=trained, batch=total_batch, batch_rule=batch_rule, ref_batch=ref_batch, ref_tokens=ref_tokens,
               lr_exponent=args.batch_lr_scaling, wd_rule=bool(args.wd_scaling), scaling_params=n_scaling,
               flops_per_token=flops_per_token, lr_factor=scale["lr"], wd_factor=scale["wd"],
               rules=describe(total_batch, trained, ref_batch, ref_tokens, args.batch_lr_scaling,
                              bool(args.wd_scaling), scale))
# the global batch is read through data streams (nanochat/dataloader.py: StepBatches), independent of world size
data_streams = args.data_streams or (prev["data_streams"] if prev else world_size)
rows_per_step = total_batch // T
if rows_per_step % data_streams:
    parser.error(f"--data-streams={data_streams}: must divide the {rows_per_step} sequences of a step "
                 f"(--total-batch-size / --sequence-len): pick a divisor of {rows_per_step}")
try:
    for split, n in (("train", data_streams), ("val", world_size)):
        if (most := max_docs_per_row_group(data_dir, split)) < n:  # the loaders stride a row group over n readers
            parser.error(f"--data-dir={data_dir}: the {split} split has at most {most} documents "
                         f"per row group, fewer than its {n} readers: use fewer streams/processes or more data")
    batches = StepBatches(tokenizer, data_dir, T, rows_per_step, data_streams, rank, world_size, device, args.seed)
except (OSError, ValueError) as e:  # a corrupt or empty shard (pyarrow's ArrowInvalid is a ValueError)
    parser.error(f"--data-dir={data_dir}: cannot read the shards ({' '.join(str(e).split())})")
eval_steps = max(1, args.eval_tokens // tokens_per_pass)

# -----------------------------------------------------------------------------
# model and optimizer

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
tuned = OptimConfig(args.matrix_optimizer, wd_schedule=args.wd_schedule,
                    **{name: getattr(args, name) for name in HP_OPTIONS},
                    **{name: type(hp_fields[name].default)(getattr(args, name)) for name in SCHEDULE_OPTIONS})
hp = replace(tuned, weight_decay=tuned.weight_decay * scale["wd"], matrix_lr=tuned.hidden_lr() * scale["lr"],
             **{name: getattr(tuned, name) * scale["lr"] for name in HP_OPTIONS if name.endswith("_lr")
                and name != "matrix_lr"})
optimizer = model.setup_optimizer(hp)
if sharded:  # same groups, ZeRO-2 step: reduce-scatters the raw local gradients itself
    optimizer = DistMuonAdamW(optimizer.param_groups, rank, world_size)
if master:
    print_role_table(model, model.param_rules(hp))
log(f"horizon {trained:,} tokens ({num_steps} steps x {total_batch:,}; {n_scaling:,} scaling parameters, "
    f"{trained / n_scaling:.3g} tokens each) | reference {ref_batch:,} x {ref_tokens:,} tokens")
for line in ([batch_rule] if batch_rule else []) + scaling["rules"]:
    log(f"  {line}")
kernel_choice = choose_kernels(model, B, dtype, log)  # checked and timed per case; compiled below as chosen
train_model = torch.compile(model, dynamic=False) if use_compile else model


def set_schedules(step):
    """nanochat's schedules (OptimConfig): every LR x lr_mult, Muon's momentum, the matrices' weight decay x wd_mult."""
    lr_mult, wd_mult, momentum = hp.lr_mult(step, num_steps), hp.wd_mult(step, num_steps), hp.momentum(step, num_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_mult
        if group["role"] == "matrix":
            group["weight_decay"] = group["base_wd"] * wd_mult
        if group["kind"] == "muon":
            group["momentum"] = momentum
    return lr_mult


# -----------------------------------------------------------------------------
# run directory, resume, logging

meta = dict(model_config=asdict(config), args=vars(args), world_size=world_size, data_dir=data_dir,
            tokenizer_dir=os.path.abspath(tok_dir), optimizer_sharded=sharded, data_streams=data_streams,
            total_batch=total_batch, kernels=kernel_choice, scaling=scaling,
            depth_factors=config.depth_factors())  # the depth rule's (CompleteP; all 1 without it)
start_step = 0
if args.resume:
    try:
        if problem := resume_problem(prev, meta["model_config"], data_streams):
            parser.error(f"--resume from {out_dir} step {prev['step']}: {problem}")
        batches.load_state_dicts(load_training_state(out_dir, prev, model, optimizer, rank, device))
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        # RuntimeError/KeyError/TypeError: a readable file whose contents do not fit (load_state_dict)
        parser.error(f"--resume: {' '.join(str(e).split())}")
    start_step = prev["step"]
    moved = f" (written by {prev['world_size']} processes, now {world_size})" * (prev["world_size"] != world_size)
    log(f"resumed from step {start_step} in {out_dir}{moved}"
        + (" (already complete)" if start_step >= num_steps else ""))
elif complete_steps(out_dir):
    parser.error(f"--out-dir={out_dir} already holds checkpoints: pass --resume or pick another --out-dir")
# every input is checked: only now join the other ranks and write anything
if ddp:
    dist_init(device)
    if problem := shared_dir_problem(out_dir, rank, world_size, device):
        parser.error(problem)
    agree_across_ranks(model, kernel_choice, log)
run_log = RunLog(out_dir, meta, master, start_step, args.run)


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
        with autocast:
            texts = sample_texts(model, tokenizer, ("ROMEO:", "To be, or not to be", "The king"), args.seed)
        model.train()
        ok = texts is not None
        for text in texts or []:
            log(f"  sample: {text!r}")
    if ddp:  # the other ranks must stop with rank 0
        flag = torch.tensor([float(ok)], device=device)
        dist.broadcast(flag, 0)
        ok = bool(flag.item())
    return ok


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


# -----------------------------------------------------------------------------
# training loop

log(f"{sum(p.numel() for p in model.parameters()):,} params | {num_steps} steps x {total_batch:,} tokens "
    f"(grad accum {grad_accum}, world {world_size}) | {device_type} {str(dtype).split('.')[-1]}"
    f"{' compiled' if use_compile else ''} | out {out_dir}")
peak_flops = peak_bf16_flops(device) if dtype == torch.bfloat16 else None  # MFU: bf16 on a GPU of known peak
checks = LateChecks()


def used(s):
    """Whether step s's results are used at once (evaluated, sampled, saved or the last step): checked at once."""
    return s == num_steps or any(n and s % n == 0 for n in (args.eval_every, args.sample_every, args.save_every))


bar = tqdm(range(start_step, num_steps), initial=start_step, total=num_steps, disable=not master, dynamic_ncols=True)
t_last = time.time()
for step in bar:
    lr_mult = set_schedules(step)
    loss_sum = torch.zeros((), device=device)
    xs, ys = batches.next()
    for k in range(grad_accum):
        x, y = xs[k * B:(k + 1) * B], ys[k * B:(k + 1) * B]
        with autocast:
            loss = train_model(x, y)
        if step + 1 == args.debug_inject_nan_step and args.debug_inject_nan_into == "loss":
            loss = loss * float("nan")
        (loss / grad_accum).backward()
        loss_sum += loss.detach()
    if ddp and not sharded:  # the replicated optimizer needs the averaged gradients (what DDP does)
        average_gradients(model.parameters())
    # non-finite guard, decided jointly: any rank's nan/inf loss or local gradient makes the average non-finite.
    # Read a step late (nanochat/health.py: no host sync while the GPU has work), at once for a step that is used.
    grad_norms = torch.stack(torch._foreach_norm([p.grad for p in model.parameters()])).sum()  # no squares: no overflow
    health = torch.stack([loss_sum / grad_accum, grad_norms])
    if ddp:
        dist.all_reduce(health, op=dist.ReduceOp.AVG)
    overflow = None
    try:
        optimizer.step()
    except RuntimeError as e:  # torch refuses an update scalar that overflows float32 (a huge lr / bias correction)
        if "overflow" not in str(e):
            raise
        overflow = f"the update overflows float32 ({e})"
    model.zero_grad(set_to_none=True)
    if step + 1 == args.debug_inject_nan_step and args.debug_inject_nan_into == "weights":
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    dt, t_last = time.time() - t_last, time.time()
    tok_per_s = total_batch / dt
    row = dict(step=step + 1, train_loss=None, lr_mult=lr_mult, tok_per_s=tok_per_s, dt=dt)
    if peak_flops:
        row["mfu"] = flops_per_token * tok_per_s / (peak_flops * world_size)
    if overflow:  # the earlier steps still count; this one stops the run
        rows, failed = checks.settle()
        failed = failed or (step + 1, overflow)
    else:
        rows, failed = checks.push(row, health[0], health[1], weights_max(model.parameters()), now=used(step + 1))
    for row in rows:  # steps whose loss, gradients and weights are finite, oldest first
        s, train_loss = row["step"], row["train_loss"]
        last = s == num_steps
        if last or (args.eval_every and s % args.eval_every == 0):
            row["val_bpb"] = evaluate()
            if not math.isfinite(row["val_bpb"]):
                stop(s, f"non-finite val bpb {row['val_bpb']}")
            log(f"step {s}: train loss {train_loss:.4f} | val bpb {row['val_bpb']:.4f}")
        postfix = dict(loss=f"{train_loss:.3f}", tok_s=f"{row['tok_per_s']:,.0f}")
        if "mfu" in row:
            postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
        bar.set_postfix(postfix)
        run_log.log(row)
        if last or (args.sample_every and s % args.sample_every == 0):
            if not sample():
                stop(s, "non-finite logits while sampling")
        if last or (args.save_every and s % args.save_every == 0):
            save_checkpoint(out_dir, s, rank, model, optimizer, sharded, batches.state_dicts(), meta, device)
    if failed:
        stop(*failed)
    t_last = time.time()  # eval, sampling and saving do not count against throughput
bar.close()
if ddp:  # every rank must hold the same weights
    checksum = replica_checksum(model.parameters(), world_size)
    log(f"all {world_size} ranks hold identical parameters (checksum {checksum:.10g})")

# -----------------------------------------------------------------------------
# summary and plot

if master and run_log.rows:
    plot_path = os.path.join(out_dir, "loss.png")
    plot_losses(run_log.rows, plot_path, os.path.basename(out_dir))
    final = run_log.rows[-1]
    log(f"done: val bpb {final.get('val_bpb', float('nan')):.4f} | train loss {final['train_loss']:.4f} | "
        f"plot {plot_path}")
run_log.finish()
if ddp:
    dist.destroy_process_group()
