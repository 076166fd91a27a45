"""Test setup: Triton's interpreter on CPU, a generated corpus + tokenizer shared by the session, and the helpers
several test files use (tiny base_train runs, relative errors)."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

# Triton kernels run in Triton's interpreter on CPU; the variable must be set before any @triton.jit module
# is imported, so it is set here, before pytest imports the test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests of the Triton paths put their tensors here: the compiled kernels on CUDA tensors where there is a GPU,
# the interpreter on CPU tensors elsewhere (CPU tensors cannot reach compiled kernels, and vice versa).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from nanochat.dataset import write_shards  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Shards of generated sentences and a small BPE trained on them. Skips its tests where rustbpe is missing (the
    lent GPU machine has none; the kernel tests need no corpus)."""
    pytest.importorskip("rustbpe", reason="rustbpe is not installed: the test tokenizer cannot be trained")
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the king queen lord speaks sleeps of my our and to a sword crown night day fair".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "." for _ in range(400)]
    data = root / "data"
    write_shards(docs, str(data), chars_per_shard=20_000)
    tok = Tokenizer.train_from_iterator(iter(docs), 300)
    tok.save(str(root / "tok"))
    return dict(data=str(data), tok=str(root / "tok"))


# -----------------------------------------------------------------------------
# helpers

# a tiny base_train model (the tests add the rest)
TINY = ["--depth", "1", "--n-embd", "32", "--n-head", "2", "--sequence-len", "32", "--device-batch-size", "4",
        "--eval-tokens", "256", "--device", "cpu", "--dtype", "float32"]


def train_cmd(corpus, out, *extra, nproc=1, env=None):
    """(command, env) of a tiny base_train run; PYTHONPATH makes it import this checkout's nanochat."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "base_train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", cmd[1]]
    cmd += TINY + ["--data-dir", corpus["data"], "--tokenizer-dir", corpus["tok"], "--out-dir", str(out), *extra]
    return cmd, dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT, **(env or {}))


def train(corpus, out, *extra, nproc=1, check=True, env=None):
    cmd, env = train_cmd(corpus, out, *extra, nproc=nproc, env=env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def torchrun(script, *argv):
    """Run python `script` (a file path) on 2 gloo ranks under torchrun; the CompletedProcess. The script's last
    line must be `os._exit(0)`: a gloo worker thread can still hold a finished collective's tensors when the
    interpreter shuts down, and releasing them then aborts the rank (SIGABRT, "terminate called without an active
    exception") after its work is done, about 1 run in 20 under torch 2.13. Exiting without teardown skips that."""
    assert open(script).read().rstrip().endswith("os._exit(0)"), f"{script} must end with os._exit(0)"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *map(str, argv)], env=env, capture_output=True, text=True, timeout=120)


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def rel_err(x, ref):
    """max |x - ref| relative to the reference's scale (absolute where the reference is all zero)."""
    ref = ref.double()
    return ((x.double() - ref).abs().max() / (ref.abs().max().item() or 1.0)).item()
