"""Small helpers shared across the repo: cache dir, device / distributed / precision setup, atomic writes, the
option parser. Torch-free at import (compute_setup imports it when called)."""

import argparse
import math
import os
import tempfile
from contextlib import contextmanager, nullcontext


def get_base_dir():
    # run-independent cache for data shards, tokenizers and downloads
    default = os.path.join(os.path.expanduser("~"), ".cache", "nanochat-mup")
    base = os.environ.get("NANOCHAT_BASE_DIR") or default
    os.makedirs(base, exist_ok=True)
    return base


def get_dist_info():
    # (ddp, rank, local_rank, world_size) from the env vars torchrun sets
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


@contextmanager
def atomic_path(path):
    # yields a temp path in the same dir (same filesystem, so os.replace is atomic); readers never
    # see a half-written file, and a crash leaves at most a stray .tmp file
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def compute_setup(device="auto", dtype="auto"):
    """This process's (device, compute dtype, autocast context) for training, benchmarks and sampling.
    device 'auto': cuda > mps > cpu; under torchrun each process takes the GPU of its LOCAL_RANK. dtype 'auto': bf16
    autocast on CUDA, fp32 elsewhere (bf16 autocast on CPU is several times slower). A device that is not there
    raises ValueError naming the fix. Imports torch here: scripts check their options with ArgParser first."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but no CUDA GPU is visible: use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device=mps but MPS is not available: use --device cpu")
    dev = torch.device("cuda", get_dist_info()[2]) if device == "cuda" else torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(dev)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA
    dt = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
          "bfloat16": torch.bfloat16}[dtype]
    return dev, dt, torch.autocast(device, dtype=dt) if dt != torch.float32 else nullcontext()


# bf16 dense tensor-core peak (FLOP/s, half the data sheets' "with sparsity" figure) by a part of the GPU's name, the
# first match winning: "NVIDIA H100 PCIe" 756e12, the SXM parts ("NVIDIA H100 80GB HBM3", "NVIDIA H200") 989e12
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def peak_bf16_flops(device):
    """bf16 dense peak of a CUDA device, for MFU; None off CUDA or for a GPU not in PEAK_BF16 (MFU then unshown)."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def dist_init(device):
    """Join the torchrun process group: NCCL on CUDA, gloo elsewhere."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


FLOAT32_MAX = 3.4028234663852886e38


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2, no usage dump), both spellings of every option, and declared checks
    run by parse_args, so a script can validate every option before it imports torch or writes anything:

        add("--lr", type=float, min=0)          # finite (no nan/inf), >= 0
        add("--depth", type=int, min=1)         # an integer >= 1 ("1.5", "nan" rejected)
        add("--mult", type=float, above=0)      # finite, > 0
        add("--out", path="out")                # creatable/writable directory; "dir": an existing directory;
                                                # "outfile": a file whose directory is creatable/writable
        add("--seqlens", type=int, min=1, nargs="+")   # numbers and choices: every value of a list is checked

    Each failure is one line naming the option, the value and what to pass instead."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.checks = []  # (flag, dest, type, min, max, above, path, choices)
        self.path_fix = {}  # flag -> what to do when the directory is missing

    def add(self, name, *, min=None, max=None, above=None, path=None, fix=None, **kw):
        """above: strict lower bound; fix: the advice for a missing directory. Numbers and choices are checked
        after argparse, so the messages are ours."""
        names = [name] + ([name.replace("-", "_").replace("__", "--", 1)] if "-" in name[2:] else [])
        kind = kw.pop("type", None) if kw.get("type") in (int, float) else None
        choices = kw.pop("choices", None)
        if choices:
            kw.setdefault("metavar", "{" + ",".join(map(str, choices)) + "}")
        action = self.add_argument(*names, **kw)
        if path:
            self.path_fix[name] = fix or "pass an existing directory"
        if kind or path or choices:
            self.checks.append((name, action.dest, kind, min, max, above, path, choices))
        return action

    def parse_args(self, args=None, namespace=None):
        return self.check(super().parse_args(args, namespace))

    def check(self, ns):
        # argparse hands a subcommand's options to its sub-parser's parse_known_args: run its checks too
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(ns, action.dest, None) in action.choices:
                action.choices[getattr(ns, action.dest)].check(ns)
        for flag, dest, kind, lo, hi, above, path, choices in self.checks:
            v = getattr(ns, dest)
            values = v if isinstance(v, list) else [v]  # nargs: a list
            if kind and v is not None:
                values = [self._number(flag, x, kind, lo, hi, above) for x in values]
                setattr(ns, dest, values if isinstance(v, list) else values[0])
            if path and v:
                self.check_path(flag, v, path)
            for x in values if choices and v is not None else []:
                if x not in choices:
                    self.error(f"{flag}={x}: not a valid choice: pass one of {', '.join(map(str, choices))}")
        return ns

    def _number(self, flag, raw, kind, lo, hi, above):
        what = "an integer" if kind is int else "a finite number"
        bounds = [f"> {above}"] if above is not None else []
        bounds += [f">= {lo}"] if lo is not None and hi is None else []
        bounds += [f"in [{lo}, {hi}]"] if lo is not None and hi is not None else []
        bounds += [f"<= {hi}"] if hi is not None and lo is None else []
        fix = f"pass {what}" + (" " + " and ".join(bounds) if bounds else "")
        try:
            v = kind(raw)
        except (TypeError, ValueError):
            self.error(f"{flag}={raw}: not {what}: {fix}")
        if kind is float and not math.isfinite(v):
            self.error(f"{flag}={raw}: not finite: {fix}")
        if kind is float and abs(v) > FLOAT32_MAX:  # it would become inf in float32 tensor arithmetic
            self.error(f"{flag}={raw}: overflows float32 (max {FLOAT32_MAX:.4g}): {fix}")
        if (above is not None and v <= above) or (lo is not None and v < lo) or (hi is not None and v > hi):
            self.error(f"{flag}={raw}: out of range: {fix}")
        return v

    def check_path(self, flag, value, kind):
        p = os.path.abspath(value)
        if kind == "dir":
            if not os.path.isdir(p):
                self.error(f"{flag}={value}: " + ("is a file" if os.path.exists(p) else "does not exist")
                           + f": {self.path_fix.get(flag, 'pass an existing directory')}")
            return
        # "out": a directory that exists or can be created, and that this process can write into; "outfile": a file
        if kind == "out" and os.path.exists(p) and not os.path.isdir(p):
            self.error(f"{flag}={value}: is a file, not a directory: pass a directory path (new or existing)")
        if kind == "outfile" and os.path.isdir(p):
            self.error(f"{flag}={value}: is a directory: pass a file path")
        if kind == "outfile":
            p = os.path.dirname(p)
        parent = p
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            self.error(f"{flag}={value}: {parent} is a file, so the directory cannot be created: pick another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            self.error(f"{flag}={value}: {parent} is not writable: pick a directory you can write to")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
