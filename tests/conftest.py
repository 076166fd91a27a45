"""Test setup: Triton's interpreter on CPU, and a generated corpus + tokenizer shared by the session."""

import os
import random

import pytest
import torch

# Triton kernels run in Triton's interpreter on CPU; the variable must be set before any @triton.jit module
# is imported, so it is set here, before pytest imports the test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests of the Triton paths put their tensors here: the compiled kernels on CUDA tensors where there is a GPU,
# the interpreter on CPU tensors elsewhere (CPU tensors cannot reach compiled kernels, and vice versa).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from nanochat.dataset import write_shards  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Shards of generated sentences and a small BPE trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the king queen lord speaks sleeps of my our and to a sword crown night day fair".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "." for _ in range(400)]
    data = root / "data"
    write_shards(docs, str(data), chars_per_shard=20_000)
    tok = Tokenizer.train_from_iterator(iter(docs), 300)
    tok.save(str(root / "tok"))
    return dict(data=str(data), tok=str(root / "tok"))
