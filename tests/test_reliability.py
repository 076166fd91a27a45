"""Bad input, table-driven: every option of base_train.py and sample.py through its bad values (nan, inf,
negative, zero, wrong type, out of range, bad paths). Each must exit 2 with one stderr line naming the option and
the value, no traceback, and leave an existing run directory byte-for-byte unchanged. The checks run before torch
is imported, so each case is a ~50 ms process and the whole table takes a few seconds."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, TINY, train

INT1 = ["0", "-1", "1.5", "nan", "x"]  # integers >= 1
INT0 = ["-1", "2.5", "inf", "x"]  # integers >= 0 (0 = off/auto)
LR = ["-0.1", "nan", "inf", "-inf", "1e39", "x"]  # finite floats >= 0 (1e39 overflows float32)
POS = ["0", "-1", "nan", "inf", "x"]  # finite floats > 0
FRAC = ["-0.1", "1.5", "nan", "inf", "x"]  # finite floats in [0, 1]
SEED = ["-1", str(2**64), "1.5", "nan"]
CHOICE = ["bogus", ""]
BOOL = ["2", "-1", "yes", ""]  # 0 or 1

# option -> bad values; {file} is an existing regular file, {missing} a path that does not exist
BASE_TRAIN = {
    "--depth": INT1, "--aspect-ratio": INT1, "--head-dim": INT1, "--n-embd": INT0, "--n-head": INT0,
    "--n-kv-head": INT0, "--sequence-len": INT1, "--window-pattern": ["X", "", "LSx"], "--softcap": LR,
    "--short-window": INT0, "--value-embeds": BOOL, "--smear": BOOL, "--backout": BOOL, "--scalar-init": CHOICE,
    "--qk-gain": POS, "--fc-init": POS, "--embed-std": POS, "--rope-base": POS, "--pad-vocab-to": INT1,
    "--gate-lr": LR, "--normuon-beta2": FRAC, "--muon-eq": BOOL, "--muon-renorm": BOOL, "--cautious-wd": BOOL,
    "--warmup-steps": INT0, "--muon-momentum": FRAC, "--momentum-start": FRAC, "--momentum-warmup": INT0,
    "--momentum-end": FRAC, "--wd-schedule": CHOICE,
    "--attn-impl": CHOICE, "--head-impl": CHOICE, "--mup-base-width": INT0, "--mup-base-head-dim": INT0,
    "--mup-base-n-kv-head": INT0, "--mup-base-depth": INT0, "--depth-alpha": FRAC, "--attn-mult": LR,
    "--output-mult": POS, "--init-scale": POS, "--matrix-optimizer": CHOICE, "--matrix-lr": LR,
    "--embedding-lr": LR,
    "--unembedding-lr": LR, "--scalar-lr": LR, "--weight-decay": LR, "--device-batch-size": INT1,
    "--total-batch-size": ["-2", "2.5", "inf", "x", "autox"], "--num-iterations": INT0, "--target-tokens": INT0,
    "--target-param-data-ratio": LR, "--target-flops": LR, "--ref-batch-size": INT0, "--ref-tokens": INT0,
    "--batch-lr-scaling": LR, "--wd-scaling": BOOL,
    "--warmdown-ratio": FRAC, "--final-lr-frac": FRAC, "--optimizer-sharding": CHOICE, "--data-streams": INT0,
    "--eval-every": INT0, "--eval-tokens": INT1, "--sample-every": INT0, "--save-every": INT0,
    "--out-dir": ["{file}", "{file}/sub"], "--data-dir": ["{missing}", "{file}"],
    "--tokenizer-dir": ["{missing}", "{file}"], "--device": ["tpu", ""], "--dtype": ["float16", ""],
    "--compile": ["2", "yes"], "--seed": SEED, "--debug-inject-nan-step": INT0,
    "--debug-inject-nan-into": CHOICE,
}
FREE = {"--resume", "--run"}  # a flag, and a free-form wandb name
SAMPLE = {
    "--run": ["{missing}", "{file}"], "--step": ["0", "-1", "x", "1.5"], "--max-tokens": INT1,
    "--temperature": ["-0.5", "nan", "inf", "x"], "--top-k": INT0, "--num-samples": INT1, "--seed": SEED,
    "--device": ["tpu", ""],
}
SAMPLE_FREE = {"--prompt"}


def options(script):
    """The options a script's --help lists (first spelling)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--help"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", r.stdout.split("\n\n")[0])) - {"--help"}


@pytest.mark.parametrize("script, table, free",
                         [("base_train.py", BASE_TRAIN, FREE), ("sample.py", SAMPLE, SAMPLE_FREE)])
def test_the_table_covers_every_option(script, table, free):
    # a new option must come with its bad values here
    assert options(script) == set(table) | free


def digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    """A finished 1-step run with a checkpoint: every bad case points at it and must leave it as it is. No softcap,
    so that huge weights can give non-finite logits (test_sample_exits_3_on_non_finite_state)."""
    out = tmp_path_factory.mktemp("existing") / "run"
    train(corpus, out, "--num-iterations", "1", "--eval-every", "0", "--eval-tokens", "128", "--softcap", "0")
    return out


def cases(tmp, corpus, run_dir):
    file, missing = tmp / "a_file", tmp / "missing"
    file.write_text("not a directory")
    fill = lambda v: v.format(file=file, missing=missing)  # noqa: E731
    base = [sys.executable, os.path.join(ROOT, "scripts", "base_train.py"), *TINY, "--data-dir", corpus["data"],
            "--tokenizer-dir", corpus["tok"], "--out-dir", str(run_dir)]
    sample = [sys.executable, os.path.join(ROOT, "scripts", "sample.py"), "--run", str(run_dir)]
    for cmd, table in ((base, BASE_TRAIN), (sample, SAMPLE)):
        for opt, values in table.items():
            for v in map(fill, values):  # "--x=-inf": argparse would read a lone "-inf" as an option
                yield (os.path.basename(cmd[1]), opt, v), cmd + ([f"{opt}={v}"] if v.startswith("-") else [opt, v])
    # options that are fine alone but not together: a muP base too narrow for the smear gate's 24 channels
    yield ("base_train.py", "--mup-base-width", "16"), base + ["--mup-base-width", "16", "--mup-base-head-dim", "16"]


@pytest.fixture(scope="module")
def bad_results(corpus, run_dir, tmp_path_factory):
    before = digest(run_dir)
    todo = dict(cases(tmp_path_factory.mktemp("bad_inputs"), corpus, run_dir))
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    run = lambda cmd: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)  # noqa: E731
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(todo, pool.map(run, todo.values())))
    return results, before, digest(run_dir)


def test_every_bad_value_exits_2_with_one_line_and_writes_nothing(bad_results):
    results, before, after = bad_results
    assert len(results) == sum(map(len, BASE_TRAIN.values())) + sum(map(len, SAMPLE.values())) + 1
    failures = []
    for (script, opt, value), r in results.items():
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        ok = (r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr and not r.stdout
              and opt in lines[0] and value in lines[0] and lines[0].startswith(f"{script}: error: "))
        if not ok:
            failures.append(f"{script} {opt} {value!r}: rc={r.returncode} {r.stderr[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert after == before  # byte for byte


@pytest.mark.parametrize("poison, message", [("nan", "non-finite weights"), ("huge", "non-finite logits")])
def test_sample_exits_3_on_non_finite_state(run_dir, tmp_path, poison, message):
    # a checkpoint from elsewhere: a nan weight, or finite weights whose logits overflow (no softcap to bound
    # them): one line, exit 3, nothing sampled
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = run / "checkpoints" / "step_000001" / "model.pt"
    w = torch.load(path)
    if poison == "nan":
        next(iter(w.values())).view(-1)[0] = float("nan")
    else:
        w["lm_head.weight"].fill_(3e38)
    torch.save(w, path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), "--run", str(run)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 3 and len(lines) == 1 and message in lines[0], r.stderr
    assert not r.stdout


def parse_error(parser, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    return e.value.code, capsys.readouterr().err.strip()


def test_argparser_checks_in_process(tmp_path, capsys):
    # the helper itself: sub-commands are checked too, and an unwritable parent is caught (not as root)
    from nanochat.common import ArgParser

    parser = ArgParser(prog="p")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("go")
    s.add("--n", type=int, default=1, min=2)
    s.add("--out", default=None, path="out")
    assert parse_error(parser, ["go", "--n", "1"], capsys) == (2, "p go: error: --n=1: out of range: pass an "
                                                                  "integer >= 2")
    assert parser.parse_args(["go", "--n", "3"]).n == 3
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may write anywhere
        code, err = parse_error(parser, ["go", "--n", "2", "--out", str(locked / "run")], capsys)
        assert code == 2 and "is not writable" in err
    p2 = ArgParser(prog="q")
    p2.add("--lr", type=float, default=0.1, min=0)
    assert parse_error(p2, ["--lr", "4e38"], capsys) == (2, "q: error: --lr=4e38: overflows float32 (max 3.403e+38): "
                                                            "pass a finite number >= 0")
    # nargs: every value is checked and converted; an unset option with choices is fine
    p3 = ArgParser(prog="r")
    p3.add("--seqlens", type=int, min=1, nargs="+", default=[8])
    p3.add("--cases", nargs="+", default=None, choices=["a", "b"])
    assert parse_error(p3, ["--seqlens", "4", "0"], capsys) == (2, "r: error: --seqlens=0: out of range: pass an "
                                                                   "integer >= 1")
    assert parse_error(p3, ["--cases", "a", "c"], capsys) == (2, "r: error: --cases=c: not a valid choice: pass one "
                                                                 "of a, b")
    ns = p3.parse_args(["--seqlens", "4", "16"])
    assert ns.seqlens == [4, 16] and ns.cases is None
