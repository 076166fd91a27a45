"""What the lent GPU machine's stack (Python 3.12, torch 2.11 + Triton 3.6, no rustbpe, no wandb, no package index)
asks of the code, checked here: training without rustbpe and wandb, each needed only where it is used and named in
one line there; the tensor collectives under the names this torch has, without its deprecation warnings; and
pyproject.toml's version ranges, which must admit both the lent stack and the exact pins CI installs. The kernels
under torch 2.11 + Triton 3.6 themselves: scripts/compat_check.sh (not in CI: a large download)."""

import os
import subprocess
import sys
import tomllib

from conftest import ROOT, torchrun, train_cmd
from packaging.requirements import Requirement

# makes `import NAME` fail for the names in HIDDEN, as if they were not installed (as tests/test_no_triton.py does)
HIDE = '''
import importlib.machinery
import runpy
import sys


class Hide(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else super().find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Hide
'''


def without(hidden, code, *argv, cwd=ROOT, env=None):
    """Run python code in a subprocess where the modules in `hidden` cannot be imported."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, "-c", f"HIDDEN = {set(hidden)!r}\n{HIDE}\n{code}", *map(str, argv)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


RUN_SCRIPT = "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"


def test_training_needs_neither_rustbpe_nor_wandb(corpus, tmp_path):
    cmd, _ = train_cmd(corpus, tmp_path / "run", "--num-iterations", "2", "--eval-every", "0")
    r = without({"rustbpe", "wandb"}, RUN_SCRIPT, *cmd[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "meta.json").exists()


def test_tokenizer_loads_without_rustbpe_and_training_names_it(corpus):
    code = '''
from nanochat.tokenizer import Tokenizer
tok = Tokenizer.load(sys.argv[1])
assert tok.decode(tok.encode("the king")) == "the king"
try:
    Tokenizer.train_from_iterator(iter(["the king"]), 300)
except ImportError as e:
    print(e)
'''
    r = without({"rustbpe"}, code, corpus["tok"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "training a tokenizer needs rustbpe, which is not installed: pip install rustbpe (or load a " \
                       "trained one with Tokenizer.load)\n"


def test_tok_train_without_rustbpe_is_one_line(corpus, tmp_path):
    script = os.path.join(ROOT, "scripts", "tok_train.py")
    r = without({"rustbpe"}, RUN_SCRIPT, script, "--data-dir", corpus["data"], "--out", tmp_path / "tok")
    assert r.returncode == 2 and r.stderr == ("tok_train.py: error: training a tokenizer needs rustbpe, which is not "
                                              "installed: pip install rustbpe\n"), r.stderr
    assert not (tmp_path / "tok").exists()


def test_run_without_wandb_is_one_line(corpus, tmp_path):
    cmd, _ = train_cmd(corpus, tmp_path / "run", "--run", "x")
    r = without({"wandb"}, RUN_SCRIPT, *cmd[1:])
    assert r.returncode == 2 and r.stderr == ("base_train.py: error: --run=x logs to wandb, which is not installed: "
                                              "pip install wandb, or drop --run\n"), r.stderr
    assert not (tmp_path / "run").exists()


SHARDED_STEP = '''
import os
import sys
import warnings

import torch
import torch.distributed as dist

from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import DistMuonAdamW

dist.init_process_group("gloo")
torch.manual_seed(0)
model = build_model(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
opt = DistMuonAdamW(model.setup_optimizer().param_groups, dist.get_rank(), dist.get_world_size())
x = torch.randint(0, 32, (2, 8))
model(x, x).backward()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt.step()
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.txt", "w") as f:  # torch 2.13 warns on its old collective names
    f.write("".join(f"{w.message}\\n" for w in caught if "torch.distributed." in str(w.message)))
dist.destroy_process_group()
os._exit(0)
'''


def test_sharded_step_uses_this_torchs_collectives(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(SHARDED_STEP)
    r = torchrun(script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["", ""]


def test_declared_ranges_admit_the_lent_stack_and_the_ci_pins():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    deps = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[name.lower()] = version
    for req in deps:  # every dependency is pinned for CI, inside its declared range
        assert req.name.lower() in pins, req.name
        assert req.specifier.contains(pins[req.name.lower()]), (req, pins[req.name.lower()])
    lent = {"torch": "2.11.0", "triton": "3.6.0"}
    assert all(req.specifier.contains(lent[req.name]) for req in deps if req.name in lent)
    assert project["requires-python"] == ">=3.11"  # the lent machine's 3.12 and CI's 3.11
