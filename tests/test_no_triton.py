"""The CPU / MPS path without Triton (it has no macOS wheel). In a subprocess where `import triton` fails as if it
were not installed: a tiny GPT with attn_impl / head_impl `auto` trains a step on CPU (SDPA attention, the chunked
PyTorch head, MuonAdamW) and generates with the KV cache without importing Triton or the kernel modules, and an
explicit `triton` impl fails in one line that names the fix. About 5 s."""

import os
import subprocess
import sys

from conftest import ROOT

HIDE_TRITON = '''
import importlib.machinery
import sys


class NoTriton(importlib.machinery.PathFinder):
    """The default path finder, blind to Triton: `import triton` raises ModuleNotFoundError, find_spec gives None."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "triton" else super().find_spec(name, path, target)


assert "triton" not in sys.modules
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = NoTriton
'''

TRAIN_STEP = '''
import pytest
import torch

from nanochat.engine import generate
from nanochat.gpt import GPTConfig, build_model

CFG = dict(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL",
           short_window=8, mup_base_width=32, softcap=15.0)


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(GPTConfig(**CFG, **kw), "cpu")


g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
model = tiny()
opt = model.setup_optimizer()
before = {n: p.detach().clone() for n, p in model.named_parameters()}
loss = model(x, y)
loss.backward()
opt.step()
assert torch.isfinite(loss), loss
assert all(torch.isfinite(p).all() for p in model.parameters())
assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
assert model(x, y).item() < loss.item()  # the step trained
assert len(generate(model, x[0, :5].tolist(), max_tokens=4)) == 4
loaded = {m.partition(".")[0] for m in sys.modules} | {m for m in sys.modules if m.startswith("kernels.")}
assert "triton" not in loaded and "kernels.attention" not in loaded and "kernels.head" not in loaded, loaded
assert "kernels.head_torch" in loaded  # the head ran the chunked PyTorch path

for impl, fix in [(dict(attn_impl="triton"), "use attn_impl='sdpa'"),
                  (dict(head_impl="triton"), "use head_impl='chunked'")]:
    with pytest.raises(ValueError) as e:
        tiny(**impl)(x, y)
    msg = str(e.value)
    assert "\\n" not in msg and "without Triton" in msg and "pip install triton" in msg and fix in msg, msg
print("ok")
'''


def test_cpu_training_step_without_triton():
    # TRITON_INTERPRET=1 lets an explicit triton impl get past the device check to the missing Triton
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", HIDE_TRITON + TRAIN_STEP], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]
