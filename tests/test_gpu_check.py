"""scripts/gpu_check.sh where there is no GPU (CUDA hidden, so this holds on GPU machines too): the bundle it carries
(--prepare), the dry run of every stage (GPU_CHECK_DRY=1: Triton's interpreter, tiny shapes) with its report, its
budget skip and its fail-fast, and its one-line refusals. About a minute, most of it the dry run."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def gpu_check(*args, timeout=300, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", SCRIPT, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bundle(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "bundle"
    r = gpu_check("--prepare", out, "--data-dir", corpus["data"], "--vocab-size", 300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def table(report):
    """{stage: (result, notes)} of the report's summary table."""
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| \d+ \| ([^|]*) \|$", report, re.M)
    return {stage: (result.strip(), notes.strip()) for stage, result, notes in rows}


def test_prepare_writes_a_small_bundle_with_its_manifest(bundle):
    manifest = json.load(open(bundle / "bundle.json"))
    assert manifest["vocab_size"] == 300
    files = manifest["files"]
    assert {"tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt"} <= set(files)
    assert sum(name.startswith("data/shard_") for name in files) >= 2
    for name, meta in files.items():
        assert (bundle / name).stat().st_size == meta["bytes"]
    assert sum(meta["bytes"] for meta in files.values()) <= 20 * 2**20
    assert gpu_check("--prepare", bundle).returncode == 2  # never into a bundle that exists


def test_dry_run_runs_every_stage_and_skips_what_does_not_fit(bundle, tmp_path):
    # the slow tier is given 300 s in a dry run: with a 270 s budget it never fits, whatever the others took
    r = gpu_check("--bundle", bundle, "--out", tmp_path, "--budget-s", 270, GPU_CHECK_DRY="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    stages = table(report)
    assert list(stages) == ["preflight", "smoke", "train", "attention", "head", "slow"], report
    assert all(stages[s][0] == "pass" for s in ("preflight", "smoke", "train", "attention", "head")), stages
    assert stages["slow"][0] == "skipped" and stages["slow"][1].startswith("needs ~300 s,"), stages
    assert "Result: no stage failed." in report
    seconds = float(re.search(r"budget 270 s, (\d+) s so far", report).group(1))
    assert seconds < 180, seconds  # the dry run's promise: under 3 minutes
    # each stage's own output: the smoke's steps, the run's kernel verdicts and metrics, the benchmarks' rows
    for step in ("triton", "attention", "head", "train"):
        assert f"\n{step}: pass: " in report, step
    assert report.count("-> triton (forced by triton)") == 3  # the smoke's 3 compiled-path steps ran both kernels
    assert len((tmp_path / "train_metrics.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "train.log").read_text().count("kernel choice: ") == 3
    attn = (tmp_path / "bench_attention.md").read_text()
    assert all(f"| 64 | - | {m} | " in attn for m in ("triton", "sdpa", "flex")), attn
    head = (tmp_path / "bench_head.md").read_text()
    assert "| eager | " in head and "| triton | " in head, head
    assert sorted(os.listdir(tmp_path)) == ["bench_attention.md", "bench_attention.png", "bench_head.md",
                                            "gpu_check.md", "train.log", "train_metrics.jsonl"]


def test_dry_run_stops_at_a_failed_smoke(bundle, tmp_path):
    r = gpu_check("--bundle", bundle, "--out", tmp_path, GPU_CHECK_DRY="1", GPU_CHECK_FAIL="attention")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    report = (tmp_path / "gpu_check.md").read_text()
    stages = table(report)
    assert stages["smoke"][0] == "FAIL (attention)" and "Result: FAILED (smoke)." in report
    assert all(stages[s] == ("not run", "the smoke failed") for s in ("train", "attention", "head", "slow"))
    assert "attention: FAIL: AssertionError: injected failure" in report
    assert os.listdir(tmp_path) == ["gpu_check.md"]


@pytest.mark.parametrize("case", ["no cuda", "no bundle", "changed bundle", "no mode"])
def test_refusals_are_one_line_and_write_nothing(bundle, tmp_path, case):
    args = {"no cuda": ["--bundle", bundle], "no bundle": ["--bundle", tmp_path],
            "changed bundle": ["--bundle", tmp_path / "copy"], "no mode": []}[case]
    if case == "changed bundle":
        subprocess.run(["cp", "-r", str(bundle), str(tmp_path / "copy")], check=True)
        with open(tmp_path / "copy" / "tokenizer" / "tokenizer.pkl", "ab") as f:
            f.write(b"x")
    message = {"no cuda": "gpu_check.sh: no CUDA GPU visible to torch", "no bundle": "no readable bundle.json",
               "changed bundle": "tokenizer/tokenizer.pkl is changed: prepare the bundle again",
               "no mode": "pass one of --prepare DIR"}[case]
    r = gpu_check(*args, "--out", tmp_path / "out", GPU_CHECK_DRY="1" if case != "no cuda" else "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
