"""The training loop's helpers that keep a GPU busy: the non-finite guard read a step late (nanochat/health.py), the
next step's batch read in a background thread (nanochat/dataloader.py: StepBatches), and the check that every rank
of a multi-node run writes its checkpoint files where rank 0 can see them (nanochat/checkpoint.py). base_train's own
non-finite and resume behaviour is tested end to end in test_dist.py and test_train.py."""

import os

import pytest
import torch
from conftest import DEVICE, torchrun

from nanochat.checkpoint import ckpt_dir, missing_rank_files
from nanochat.dataloader import DataLoader, StepBatches
from nanochat.health import LateChecks, weights_max
from nanochat.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# the non-finite guard, a step late


def push(checks, step, loss=1.0, grads=1.0, weights=1.0, now=False):
    t = lambda v: torch.tensor(v, device=DEVICE)  # noqa: E731
    return checks.push(dict(step=step, train_loss=None), t(loss), t(grads), t([weights]), now)


def test_steps_are_read_a_step_late_unless_used_at_once():
    checks = LateChecks()
    assert push(checks, 1, loss=2.0) == ([], None)  # nothing read yet: step 1 is still on its way
    rows, failed = push(checks, 2, loss=3.0)
    assert rows == [dict(step=1, train_loss=2.0)] and failed is None
    rows, failed = push(checks, 3, loss=4.0, now=True)  # a step to evaluate or save: read at once
    assert [r["step"] for r in rows] == [2, 3] and [r["train_loss"] for r in rows] == [3.0, 4.0] and failed is None
    assert checks.pending == []


@pytest.mark.parametrize("bad, message", [(dict(loss=float("nan")), "non-finite loss nan or gradient norms 1.0"),
                                          (dict(grads=float("inf")), "non-finite loss 1.0 or gradient norms inf"),
                                          (dict(weights=float("inf")), "non-finite parameters after the update")])
def test_the_first_bad_step_is_named_and_nothing_after_it_passes(bad, message):
    checks = LateChecks()
    push(checks, 1)
    assert push(checks, 2, **bad) == ([dict(step=1, train_loss=1.0)], None)  # step 2 is not read yet
    assert push(checks, 3, now=True) == ([], (2, message))  # step 3 is fine, but it comes after the bad step 2


def test_weights_max_is_a_device_tensor_of_the_largest_magnitude():
    params = [torch.tensor([1.0, -5.0], device=DEVICE), torch.tensor([[3.0]], device=DEVICE)]
    worst = weights_max(params)
    assert worst.device.type == DEVICE and worst.tolist() == [5.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a GPU")
def test_a_deferred_step_makes_no_host_sync():
    checks = LateChecks()
    t = torch.ones((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        checks.push(dict(step=1), t, t, weights_max([t.reshape(1)]), now=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checks.settle()[0] == [dict(step=1, train_loss=1.0)]


# -----------------------------------------------------------------------------
# the next step's batch, read ahead


def test_read_ahead_gives_the_same_batches_and_states(corpus):
    tok = Tokenizer.load(corpus["tok"])
    steps = StepBatches(tok, corpus["data"], 16, 8, 2, 0, 1, DEVICE, seed=3)
    plain = [DataLoader(tok, corpus["data"], 4, 16, "train", s, 2, "cpu", seed=3) for s in range(2)]
    for _ in range(5):
        x, y = steps.next()
        xs, ys = zip(*(loader.next_batch() for loader in plain))
        assert x.device.type == DEVICE and torch.equal(x.cpu(), torch.cat(xs)) and torch.equal(y.cpu(), torch.cat(ys))
    # the saved position is after the 5 batches handed out, not the 6th already read ahead
    states = steps.state_dicts()
    for got, want in zip(states, (loader.state_dict() for loader in plain), strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) if torch.is_tensor(got[k]) else got[k] == want[k] for k in got)
    # and a fresh reader continued from it yields what the first one yields next
    resumed = StepBatches(tok, corpus["data"], 16, 8, 2, 0, 1, DEVICE, seed=3)
    resumed.load_state_dicts(dict(enumerate(states)))
    for _ in range(3):
        assert torch.equal(resumed.next()[0], steps.next()[0])


# -----------------------------------------------------------------------------
# checkpoint files of every rank, where rank 0 writes the commit mark

PROBE = '''
import os, sys, torch.distributed as dist
from nanochat.checkpoint import shared_dir_problem
dist.init_process_group("gloo")
rank = dist.get_rank()
root = sys.argv[1]
run_dir = root if sys.argv[2] == "shared" else os.path.join(root, f"node{rank}")  # separate disks: a dir per node
result = f"{shared_dir_problem(run_dir, rank, 2, 'cpu')} {sorted(os.listdir(run_dir))}"
dist.destroy_process_group()
with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
    f.write(result)
os._exit(0)
'''


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_ranks_refuse_a_run_dir_they_do_not_share(tmp_path, layout):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    r = torchrun(script, tmp_path / "runs", layout)
    assert r.returncode == 0, r.stderr[-2000:]
    results = [(tmp_path / "runs" / f"rank{rank}.txt").read_text() for rank in range(2)]
    if layout == "shared":
        assert results == ["None []", "None []"]  # no problem, and the probes are gone
    else:
        for result in results:
            assert "see only 1 of the 2 ranks' files" in result and "filesystem every node shares" in result, result
            assert result.endswith(" []")


def test_missing_rank_files_are_listed(tmp_path):
    d = ckpt_dir(str(tmp_path), 4)
    os.makedirs(d)
    for name in ("loader_rank0.pt", "rng_rank0.pt", "optim_rank0.pt"):
        open(os.path.join(d, name), "w").close()
    assert missing_rank_files(str(tmp_path), 4, 1, sharded=True) == []
    assert missing_rank_files(str(tmp_path), 4, 2, sharded=True) == ["loader_rank1.pt", "rng_rank1.pt",
                                                                     "optim_rank1.pt"]
    assert missing_rank_files(str(tmp_path), 4, 2, sharded=False) == ["loader_rank1.pt", "rng_rank1.pt"]
