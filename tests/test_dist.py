"""Distributed training and fault tolerance: sharded optimizer vs gradient accumulation, kill -9 and resume,
the non-finite guard, and bad inputs that must fail in one line before anything is written."""

import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import metrics, train, train_cmd

from nanochat.tokenizer import Tokenizer


def final_weights(out):
    steps = sorted(os.listdir(out / "checkpoints"))
    return torch.load(out / "checkpoints" / steps[-1] / "model.pt")


# world 3: the padding path (Muon stacks of 4 and 1 matrices padded to 6 and 3). The residual scalars and the
# smear/backout lambdas are frozen there: at init their exact gradient is 0 (zero-init out-projections and a final
# norm make the loss invariant to them), so they get pure rounding noise, and AdamW's first step is lr * sign(noise).
# The noise is the same for any order of summing 2 terms, not 3, so a 3-way split flips the sign of a 0.2-0.5 step:
# any two correct implementations disagree there, sharded or not. The value embeddings are off there for the same
# reason: Muon's polar factor of the 2x12 value-embedding gate amplifies the 3-way sum's rounding to 5e-5 of the
# gate's norm after 20 steps (measured; every other tensor <= 5e-6 without them, <= 1.3e-5 with them).
@pytest.mark.parametrize("world, extra", [(2, []), (3, ["--scalar-lr", "0", "--gate-lr", "0", "--value-embeds", "0"])])
def test_sharded_ranks_match_one_process_accumulating(corpus, tmp_path, world, extra):
    # same --data-streams and --total-batch-size: the same global batches, split 1 x world or world x 1
    common = ["--num-iterations", "20", "--eval-every", "0", "--data-streams", str(world),
              "--total-batch-size", str(128 * world), "--weight-decay", "0.1", "--save-every", "10", *extra]
    r = train(corpus, tmp_path / "ddp", *common, nproc=world)
    assert f"all {world} ranks hold identical parameters" in r.stdout + r.stderr
    if world == 2:  # resume the sharded run from step 10 (per-rank optimizer shards): bit-identical
        shutil.copytree(tmp_path / "ddp", tmp_path / "resumed")
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000020")
        train(corpus, tmp_path / "resumed", *common, "--resume", nproc=world)
        losses = [[m["train_loss"] for m in metrics(tmp_path / d)] for d in ("ddp", "resumed")]
        assert losses[0] == losses[1] and len(losses[0]) == 20
        a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "resumed")
        assert all(torch.equal(a[k], b[k]) for k in a)
    train(corpus, tmp_path / "one", *common)
    dist_losses = [m["train_loss"] for m in metrics(tmp_path / "ddp")]
    one_losses = [m["train_loss"] for m in metrics(tmp_path / "one")]
    assert len(dist_losses) == 20
    assert torch.allclose(torch.tensor(dist_losses), torch.tensor(one_losses), rtol=1e-5, atol=0)
    if world == 2:  # elastic resume both ways: the other run's step-10 checkpoint, continued on this world size
        assert_elastic_resume(corpus, tmp_path, "ddp", "one", 1, common)  # 2 sharded ranks -> 1 process
        assert_elastic_resume(corpus, tmp_path, "one", "ddp", 2, common)  # 1 process -> 2 sharded ranks
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints" / "step_000020")) == sorted(
        ["meta.json", "model.pt"] + [f"{f}_rank{r}.pt" for f in ("loader", "rng", "optim") for r in range(world)])
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one")
    for k in a:  # relative to the tensor's norm: elementwise, entries near 0 would ask for more than fp32 gives
        assert (a[k] - b[k]).norm() <= 1e-5 * b[k].norm(), k


def assert_elastic_resume(corpus, tmp_path, src, ref, nproc, common, extra=()):
    """Resume run `src` from its step-10 checkpoint with `nproc` processes; its losses from step 11 on must match
    run `ref`, which ran with `nproc` processes from the start, as closely as N-vs-1 runs match (1e-5 relative)."""
    out = tmp_path / f"{src}_on_{nproc}"
    shutil.copytree(tmp_path / src, out)
    shutil.rmtree(out / "checkpoints" / "step_000020")
    r = train(corpus, out, *common, *extra, "--resume", nproc=nproc)
    assert "resumed from step 10" in r.stdout + r.stderr and "processes, now" in r.stdout + r.stderr
    got, want = ([m["train_loss"] for m in metrics(d)] for d in (out, tmp_path / ref))
    assert len(got) == 20
    diff = max(abs(a - b) for a, b in zip(got[10:], want[10:]))
    print(f"elastic resume {src} -> {nproc} processes vs {ref}: max |loss diff| steps 11-20 = {diff:.3g}")
    assert torch.allclose(torch.tensor(got[10:]), torch.tensor(want[10:]), rtol=1e-5, atol=0)


def test_elastic_resume_3_sharded_ranks_on_2_sharded(corpus, tmp_path):
    # 3 streams of 4 sequences a step over 2 ranks of 6: rank 0 reads stream 0 and the first half of stream 1,
    # rank 1 the rest of stream 1 and stream 2 (a stream split between ranks); the 3 optimizer shards (Muon
    # stacks padded to a multiple of 3) are re-cut into 2 (padded to a multiple of 2). Reference: 2 ranks with
    # the same 3 streams from the start. (Replicated on either side: the 2 -> 1 and 1 -> 2 cases above.)
    common = ["--num-iterations", "20", "--eval-every", "0", "--data-streams", "3", "--total-batch-size", "384",
              "--weight-decay", "0.1", "--save-every", "10", "--scalar-lr", "0"]  # frozen scalars: see above
    on2 = ["--device-batch-size", "6"]
    train(corpus, tmp_path / "three", *common, nproc=3)
    train(corpus, tmp_path / "two", *common, *on2, nproc=2)
    assert_elastic_resume(corpus, tmp_path, "three", "two", 2, common, on2)


def test_sigkill_then_resume_is_bit_identical(corpus, tmp_path):
    common = ["--num-iterations", "12", "--eval-every", "0", "--save-every", "1"]
    train(corpus, tmp_path / "ref", *common)
    out = tmp_path / "run"
    cmd, env = train_cmd(corpus, out, *common)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(open(out / "metrics.jsonl").readlines()) < 5:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # and as if a later save had crashed mid-write: a step folder without meta.json and a stray temp file
    last = sorted(os.listdir(out / "checkpoints"))[-1]
    crashed = out / "checkpoints" / "step_000999"
    crashed.mkdir()
    (crashed / "model.pt").write_bytes(b"truncated")
    (out / "checkpoints" / last / "model.pt.abc123.tmp").write_bytes(b"half")
    r = train(corpus, out, *common, "--resume")
    assert "resumed from step" in r.stdout
    assert [m["train_loss"] for m in metrics(out)] == [m["train_loss"] for m in metrics(tmp_path / "ref")]
    a, b = final_weights(tmp_path / "ref"), torch.load(out / "checkpoints" / "step_000012" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    r = train(corpus, out, "--num-iterations", "8", "--eval-every", "0", "--save-every", "2",
              "--debug-inject-nan-step", "5", check=False)
    assert r.returncode == 3, r.stderr
    lines = [line for line in r.stderr.splitlines() if "non-finite" in line]  # the rest is the progress bar
    assert len(lines) == 1 and lines[0] == r.stderr.splitlines()[-1], r.stderr
    assert lines[0].startswith("step 5: non-finite loss nan") and "checkpoint: step 4" in lines[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002", "step_000004"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


# (1, loss) is test_non_finite_loss_stops_and_keeps_last_good_checkpoint; weights: the update of the LAST step
@pytest.mark.parametrize("nproc, into, step", [(2, "loss", 3), (1, "weights", 4), (2, "weights", 4)])
def test_non_finite_guard_single_and_torchrun(corpus, tmp_path, nproc, into, step):
    out = tmp_path / "run"
    r = train(corpus, out, "--num-iterations", "4", "--eval-every", "0", "--save-every", "2",
              "--debug-inject-nan-step", str(step), "--debug-inject-nan-into", into, nproc=nproc, check=False)
    lines = [line for line in r.stderr.splitlines() if "non-finite" in line]
    assert len(lines) == 1 and lines[0].startswith(f"step {step}: non-finite ") and "checkpoint: step 2" in lines[0]
    if nproc == 1:
        assert r.returncode == 3 and lines[0] == r.stderr.splitlines()[-1], r.stderr
    else:  # every rank exits 3; torchrun itself exits 1 and names the first failure
        assert r.returncode != 0 and re.search(r"exitcode\s*: 3", r.stderr), r.stderr[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002"]
    assert [m["step"] for m in metrics(out)] == list(range(1, step))  # the bad step is neither logged nor saved
    w = final_weights(out)
    assert all(torch.isfinite(t).all() for t in w.values())


def test_an_overflowing_update_stops_before_anything_uses_it(corpus, tmp_path):
    # the issue's `--embedding-lr inf --num-iterations 1`, with a finite but float32-overflowing LR (inf is exit 2)
    out = tmp_path / "run"
    r = train(corpus, out, "--num-iterations", "1", "--embedding-lr", "1e38", "--warmup-steps", "0", check=False)
    lines = [line for line in r.stderr.splitlines() if "step 1:" in line]
    assert r.returncode == 3 and len(lines) == 1 and "overflows float32" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "sample:" not in r.stdout and not (out / "checkpoints").exists()


# -----------------------------------------------------------------------------
# bad inputs: one line on stderr naming the value, exit 2, nothing written


@pytest.fixture(scope="session")
def ckpt_run(corpus, tmp_path_factory):
    """A finished 2-step run with checkpoints, copied per test case before it is tampered with."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(corpus, out, "--num-iterations", "2", "--eval-every", "0", "--eval-tokens", "128")
    return out


@pytest.fixture(scope="session")
def other_tokenizer(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok280")
    docs = [f"the {w} speaks of night and day." for w in "king queen lord sword crown fair".split()] * 50
    Tokenizer.train_from_iterator(iter(docs), 280).save(str(path))
    return str(path)


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def corrupt_shard(data):
    shard = sorted(data.glob("shard_*.parquet"))[0]
    shard.write_bytes(b"")


STEP = "checkpoints/step_000002"
TORCHRUN_RANK0 = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")  # validation runs before any rendezvous
BAD = [
    # (case, extra args, env, tamper with the run dir or data copy, expected text); {run} needs the checkpoint
    ("sharding without ranks", ["--optimizer-sharding", "on"], None, None, "--optimizer-sharding=on"),
    ("streams vs accum", ["--data-streams", "3", "--total-batch-size", "256"], None, None, "--data-streams=3"),
    ("negative save", ["--save-every", "-1"], None, None, "--save-every=-1"),
    ("world vs batch", ["--total-batch-size", "384"], TORCHRUN_RANK0, None, "--total-batch-size=384"),
    ("empty shard", [], None, "shard", "cannot read the shards"),
    ("no tokenizer", ["--tokenizer-dir", "{tmp}"], None, None, "holds no trained tokenizer"),
    ("resume, nothing there", ["--resume"], None, None, "no complete checkpoint"),
    ("exists, no resume", [], None, "run", "already holds checkpoints"),
    ("corrupt weights", ["--resume"], None, lambda d: (d / STEP / "model.pt").write_bytes(b"\0" * 64),
     "model.pt is corrupt"),
    ("truncated optimizer", ["--resume"], None, lambda d: truncate(d / STEP / "optim.pt"), "optim.pt is corrupt"),
    ("missing loader state", ["--resume"], None, lambda d: os.remove(d / STEP / "loader_rank0.pt"),
     "loader_rank0.pt is missing"),
    ("corrupt meta", ["--resume"], None, lambda d: truncate(d / STEP / "meta.json"), "meta.json is corrupt"),
    ("other vocab", ["--resume", "--tokenizer-dir", "{tok280}"], None, "run",
     "vocab_size=300 in the checkpoint but vocab_size=280"),
    ("other width", ["--resume", "--n-embd", "64"], None, "run", "n_embd=32 in the checkpoint but n_embd=64"),
    # the checkpoint's global batch (4 sequences) cannot be split over 2 processes x 4 sequences
    ("other world size", ["--resume"], TORCHRUN_RANK0, "run", "the checkpoint's 128 tokens is not divisible by "
     "device_batch_size*sequence_len*world_size = 4*32*2 = 256: use --device-batch-size 2"),
    ("other streams", ["--resume", "--data-streams", "2", "--total-batch-size", "256"], None, "run",
     "the checkpoint has 1 data streams, this run --data-streams=2"),
]


def snapshot(path):
    if not path.exists():
        return None
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))}


def run_bad(corpus, ckpt_run, other_tokenizer, root, args, env, tamper):
    """Run one bad case in its own folder: (result, files of the out dir before, after)."""
    out, data = root / "run", corpus["data"]
    if tamper == "shard":
        data = root / "data"
        shutil.copytree(corpus["data"], data)
        corrupt_shard(data)
    elif tamper is not None:
        shutil.copytree(ckpt_run, out)
        if callable(tamper):
            tamper(out)
    args = [a.format(tmp=root, tok280=other_tokenizer) for a in args]
    before = snapshot(out)
    r = train(dict(corpus, data=str(data)), out, *args, env=env, check=False)
    return r, before, snapshot(out)


@pytest.fixture(scope="session")
def bad_runs(corpus, ckpt_run, other_tokenizer, tmp_path_factory):
    # all cases at once, 4 at a time: each is mostly interpreter and torch start-up
    with ThreadPoolExecutor(4) as pool:
        futures = {case: pool.submit(run_bad, corpus, ckpt_run, other_tokenizer, tmp_path_factory.mktemp("bad"),
                                     args, env, tamper) for case, args, env, tamper, _ in BAD}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case, message", [(b[0], b[-1]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2_nothing_written(bad_runs, case, message):
    r, before, after = bad_runs[case]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert after == before
