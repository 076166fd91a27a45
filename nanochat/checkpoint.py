"""
Checkpoints: one folder per step, `<run>/checkpoints/step_000123/`, holding model.pt, the optimizer state
(optim.pt, or optim_rank<r>.pt per rank when the optimizer is sharded), loader_rank<r>.pt (the states of
the data streams that rank owns), rng_rank<r>.pt and meta.json. Every file is written atomically (temp file,
fsync, rename) and meta.json is written last, by rank 0, after all ranks have written theirs: a folder
without meta.json (a crash mid-save) is incomplete and never picked for resume; stray .tmp files are
ignored and the previous complete checkpoint stays intact.

Elastic resume: nothing in a checkpoint is tied to the world size that wrote it. The weights are whole, the
optimizer state is re-partitioned on load (MuonAdamW.load_resharded) and the data position is one state per
data stream, whichever rank saved it, so a run written by N processes continues on M.
"""

import io
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.common import atomic_write_bytes, atomic_write_text
from nanochat.gpt import GPTConfig, build_model


def ckpt_dir(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def _save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def optim_file(rank, sharded):
    return f"optim_rank{rank}.pt" if sharded else "optim.pt"


def save_rank_files(run_dir, step, rank, loader_state, rng_state, optim_state=None):
    """Every rank: its loader and RNG states and, when the optimizer is sharded, its optimizer shard."""
    d = ckpt_dir(run_dir, step)
    _save(loader_state, os.path.join(d, f"loader_rank{rank}.pt"))
    _save(rng_state, os.path.join(d, f"rng_rank{rank}.pt"))
    if optim_state is not None:
        _save(optim_state, os.path.join(d, optim_file(rank, sharded=True)))


def save_main_files(run_dir, step, model, optim_state, meta, keep=2):
    """Rank 0, after every rank's files are on disk: weights, the replicated optimizer state (None when
    sharded), then meta.json (the commit mark)."""
    d = ckpt_dir(run_dir, step)
    _save(model.state_dict(), os.path.join(d, "model.pt"))
    if optim_state is not None:
        _save(optim_state, os.path.join(d, optim_file(0, sharded=False)))
    atomic_write_text(os.path.join(d, "meta.json"), json.dumps(dict(meta, step=step), indent=2))
    for old in complete_steps(run_dir)[:-keep]:
        shutil.rmtree(ckpt_dir(run_dir, old), ignore_errors=True)


def complete_steps(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = [int(m.group(1)) for n in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", n))]
    return sorted(s for s in steps if os.path.exists(os.path.join(ckpt_dir(run_dir, s), "meta.json")))


def load_meta(run_dir, step=None):
    """meta.json of the given (default: latest complete) checkpoint, or a clear error."""
    steps = complete_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir}/checkpoints: train with --save-every first")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {run_dir}: have {steps}")
    path = os.path.join(ckpt_dir(run_dir, step), "meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise ValueError(f"checkpoint file {path} is corrupt: delete that checkpoint folder to resume from the "
                         "previous one") from None


def load_file(run_dir, step, name, device="cpu"):
    path = os.path.join(ckpt_dir(run_dir, step), name)
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # torch raises several types for truncated or corrupt files
        raise ValueError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}): "
                         "delete that checkpoint folder to resume from the previous one") from None


def load_optimizer(optimizer, run_dir, meta):
    """Load checkpoint `meta`'s optimizer state, saved by any world size, sharded or not, into `optimizer`."""
    sharded = meta["optimizer_sharded"]
    names = [optim_file(r, True) for r in range(meta["world_size"])] if sharded else [optim_file(0, False)]
    # on the CPU: a rank reads every shard, and only its own part moves to the device
    optimizer.load_resharded([load_file(run_dir, meta["step"], n) for n in names], sharded)


def load_stream_states(run_dir, meta):
    """{stream index: loader state} of every data stream of checkpoint `meta`, read from all its ranks' files."""
    states = {}
    for r in range(meta["world_size"]):
        for st in load_file(run_dir, meta["step"], f"loader_rank{r}.pt"):
            states[st["rank"]] = st  # a stream's loader state keeps its stream index as "rank"
    if missing := sorted(set(range(meta["data_streams"])) - set(states)):
        raise ValueError(f"checkpoint step {meta['step']} in {run_dir} has no loader state for data streams "
                         f"{missing}: it is incomplete")
    return states


def load_model(run_dir, device, step=None):
    """Model of a run's checkpoint (for sampling/eval), with its meta."""
    meta = load_meta(run_dir, step)
    model = build_model(GPTConfig(**meta["model_config"]), device)
    model.load_state_dict(load_file(run_dir, meta["step"], "model.pt", device))
    return model, meta


def total_batch_of(meta):
    """Tokens per optimizer step of the run that wrote checkpoint `meta` (older checkpoints record only the args)."""
    a = meta["args"]
    one_pass = a["device_batch_size"] * a["sequence_len"] * meta["world_size"]
    return meta.get("total_batch") or a["total_batch_size"] or one_pass


def resume_problem(meta, model_config, data_streams):
    """Why checkpoint `meta` cannot be continued by a run of this model config (a dict) and number of data streams,
    or None. The world size, optimizer sharding and batch split are free: the state is re-partitioned on load."""
    for k, v in model_config.items():
        if meta["model_config"].get(k) != v:
            return f"{k}={meta['model_config'].get(k)!r} in the checkpoint but {k}={v!r} in this run"
    if meta["data_streams"] != data_streams:
        return (f"the checkpoint has {meta['data_streams']} data streams, this run --data-streams={data_streams}: "
                "drop --data-streams to continue the checkpoint's")
    return None


def load_training_state(run_dir, meta, model, optimizer, rank, device):
    """Continue checkpoint `meta` on this rank: its weights, optimizer state and RNG state are loaded in place (a
    rank the checkpoint did not have takes rank 0's RNG: every rank seeds and draws alike); returns its
    data-stream states."""
    model.load_state_dict(load_file(run_dir, meta["step"], "model.pt", device))
    load_optimizer(optimizer, run_dir, meta)
    streams = load_stream_states(run_dir, meta)
    rng = load_file(run_dir, meta["step"], f"rng_rank{rank if rank < meta['world_size'] else 0}.pt")
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return streams


def shared_dir_problem(run_dir, rank, world_size, device):
    """Why the ranks cannot share run_dir, or None. Every rank writes a probe file there and looks for everyone's: with
    nodes on separate disks, rank 0 would otherwise mark checkpoints complete (meta.json) that lack the other nodes'
    files. Collective: every rank calls it, and all get the same answer."""
    probe = os.path.join(run_dir, f".probe_rank{rank}")
    atomic_write_text(probe, "")
    dist.barrier()
    seen = sum(os.path.exists(os.path.join(run_dir, f".probe_rank{r}")) for r in range(world_size))
    fewest = torch.tensor([seen], device=device)
    dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
    dist.barrier()  # everyone has looked: the probes can go
    os.remove(probe)
    dist.barrier()
    if fewest.item() < world_size:
        return (f"--out-dir={run_dir}: some ranks see only {fewest.item()} of the {world_size} ranks' files there: "
                "with several nodes, pass a directory on a filesystem every node shares")
    return None


def missing_rank_files(run_dir, step, world_size, sharded):
    """The per-rank files of checkpoint `step` that this process cannot see."""
    names = [f"{kind}_rank{r}.pt" for r in range(world_size) for kind in ("loader", "rng")]
    names += [optim_file(r, True) for r in range(world_size)] if sharded else []
    return [n for n in names if not os.path.exists(os.path.join(ckpt_dir(run_dir, step), n))]


def save_checkpoint(run_dir, step, rank, model, optimizer, sharded, loader_states, meta, device):
    """Every rank writes its files (loader and RNG states, its optimizer shard when sharded); once all are on disk and
    visible to rank 0, rank 0 writes the weights, the replicated optimizer state and meta.json, the commit mark."""
    ddp = dist.is_initialized()
    world_size = dist.get_world_size() if ddp else 1
    cuda_rng = torch.cuda.get_rng_state() if device.type == "cuda" else None
    save_rank_files(run_dir, step, rank, loader_states, dict(cpu=torch.get_rng_state(), cuda=cuda_rng),
                    optimizer.state_dict() if sharded else None)
    if ddp:
        dist.barrier()
    if rank == 0:
        if missing := missing_rank_files(run_dir, step, world_size, sharded):  # a node's disk was lost mid-run
            raise RuntimeError(f"checkpoint step {step} in {run_dir}: rank 0 cannot see {', '.join(missing)}; "
                               "not marking it complete: the run directory must be on a filesystem every node shares")
        save_main_files(run_dir, step, model, None if sharded else optimizer.state_dict(), meta)
    if ddp:
        dist.barrier()
