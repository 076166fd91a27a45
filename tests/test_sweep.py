"""End-to-end transfer sweep: scripts/sweep.sh (two shards in parallel, resume, a killed run) on a tiny model and
the generated corpus, then scripts/transfer_report.py and the command it recommends."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from nanochat.transfer import fit_optimum, read_runs, recommend, summarize

SWEEP = ["bash", os.path.join(ROOT, "scripts", "sweep.sh")]
TRAIN = ["--head-dim", "16", "--sequence-len", "32", "--device-batch-size", "4", "--num-iterations", "3",
         "--eval-tokens", "256", "--eval-every", "0", "--device", "cpu", "--dtype", "float32"]


def env(**kw):
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", WANDB_MODE="disabled", **kw)


def sweep_args(corpus, out, **kw):
    flags = {**dict(hp="matrix_lr", out=str(out), widths="32 64", mults="-1 0 1", seeds="0", depths="1"), **kw}
    return [a for k, v in flags.items() for a in (f"--{k}", v)] + ["--", *TRAIN, "--data-dir", corpus["data"],
                                                                     "--tokenizer-dir", corpus["tok"]]


@pytest.fixture(scope="module")
def swept(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "mlr"
    procs = [subprocess.Popen(SWEEP + sweep_args(corpus, out), env=env(SHARD=f"{i}/2"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    return out, logs


def test_sweep_runs_every_point_once_with_the_swept_value(swept):
    out, logs = swept
    assert all("6 in shard" in log and "ETA" in log for log in logs)
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 12  # 2 widths x 3 multipliers x 2 modes x 1 seed
    for run in runs:
        point, cfg = json.load(open(run / "point.json")), json.load(open(run / "config.json"))
        assert (run / "DONE").read_text().strip() == "ok"
        assert len(open(run / "metrics.jsonl").readlines()) == 3
        assert not (run / "checkpoints").exists()
        assert cfg["args"]["matrix_lr"] == pytest.approx(0.02 * 2.0 ** point["x"])
        assert cfg["model_config"]["n_embd"] == point["width"]
        assert cfg["model_config"]["mup_base_width"] == (32 if point["mode"] == "mup" else 0)


def test_a_base_value_given_after_the_separator_is_scaled_not_kept(corpus, tmp_path):
    # the documented way to set the base (--matrix-lr V after --) must not override the swept value of every point
    args = sweep_args(corpus, tmp_path / "base", widths="32", mults="-1 1", modes="mup") + ["--matrix-lr", "0.01"]
    r = subprocess.run(SWEEP + args, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lrs = {json.load(open(run / "point.json"))["x"]: json.load(open(run / "config.json"))["args"]["matrix_lr"]
           for run in (tmp_path / "base").iterdir() if run.is_dir()}
    assert lrs == {-1: pytest.approx(0.005), 1: pytest.approx(0.02)}


def test_sweep_resumes_and_restarts_a_killed_run(swept, corpus):
    out, _ = swept
    killed = out / "mup_d1_w64_x1_s0"
    (killed / "DONE").unlink()
    (killed / "partial").write_text("left by a killed run")
    r = subprocess.run(SWEEP + sweep_args(corpus, out), env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("skipped") == 11 and r.stdout.count(": ok in") == 1, r.stdout
    assert (killed / "DONE").read_text().strip() == "ok" and not (killed / "partial").exists()


@pytest.mark.parametrize("bad, message", [
    (dict(shard="2/2"), "--shard 2/2"),
    (dict(widths="32 x"), "x is not an integer"),
    (dict(hp="output_mult"), "pass --modes mup"),
    (dict(hp="nope"), "not sweepable"),
])
def test_sweep_refuses_bad_arguments_in_one_line(corpus, tmp_path, bad, message):
    r = subprocess.run(SWEEP + sweep_args(corpus, tmp_path / "s", **bad), env=env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "s").exists()


def second_pass(out, dest, pattern):
    """A fake second tuning pass of the sweep in `out`: copies of its runs matching `pattern`, best at x = 1."""
    dest.mkdir()
    shutil.copy(out / "sweep.json", dest / "sweep.json")
    for run in out.glob(pattern):
        shutil.copytree(run, dest / run.name)
        m = [json.loads(line) for line in open(dest / run.name / "metrics.jsonl")]
        m[-1]["val_bpb"] = 1.0 if json.load(open(run / "point.json"))["x"] == 1 else 2.0
        (dest / run.name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m))
    return dest


def test_report_files_and_recommended_command(swept, corpus, tmp_path):
    out, _ = swept
    rep = tmp_path / "report"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "transfer_report.py"), str(out), "--out",
                        str(rep), "--n-boot", "50"], env=env(PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (rep / "transfer_matrix_lr.png").stat().st_size > 5000
    assert "slope of log2 optimum" in (rep / "report.md").read_text()
    report = json.load(open(rep / "report.json"))
    x = report["sweeps"]["matrix_lr"]["recommended_log2"]
    assert -1 <= x <= 1 or report["sweeps"]["matrix_lr"]["recommended_how"].startswith("fitted line")
    cmd = shlex.split(report["command"])
    assert cmd[:8] == ["python", "scripts/base_train.py", "--n-embd", "256", "--depth", "1", "--mup-base-width", "32"]
    assert cmd[cmd.index("--matrix-lr") + 1] == f"{0.02 * 2.0 ** x:.4g}" and cmd.count("--matrix-lr") == 1
    assert report["command"] in r.stdout
    # the recommendation runs as printed (one step, into a fresh directory)
    run = subprocess.run([sys.executable, *cmd[1:], "--num-iterations", "1", "--out-dir", str(tmp_path / "big")],
                         cwd=ROOT, env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.load(open(tmp_path / "big" / "config.json"))["model_config"]["n_embd"] == 256
    # a second pass of the same hyperparameter: its own section and plot, and it alone sets the recommended value
    second = second_pass(out, tmp_path / "pass2", "mup_*")
    r2 = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "transfer_report.py"), str(out), str(second),
                         "--out", str(rep), "--n-boot", "50"], env=env(PYTHONPATH=ROOT), capture_output=True,
                        text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr
    report = json.load(open(rep / "report.json"))
    assert report["sweeps"]["matrix_lr_pass2"]["recommended_log2"] == pytest.approx(1)
    assert (rep / "transfer_matrix_lr_pass2.png").exists()
    cmd = shlex.split(report["command"])
    assert cmd.count("--matrix-lr") == 1 and cmd[cmd.index("--matrix-lr") + 1] == f"{0.02 * 2.0:.4g}"


def test_report_command_takes_the_proxy_to_the_target_batch_and_horizon(swept, tmp_path):
    out, _ = swept
    rep = tmp_path / "report"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "transfer_report.py"), str(out), "--out",
                        str(rep), "--n-boot", "20", "--target-width", "64", "--target-depth", "2", "--target-tokens",
                        str(384 * 8), "--target-batch", "auto"], env=env(PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.load(open(rep / "report.json"))
    cmd = shlex.split(report["command"])
    opt = lambda o: cmd[cmd.index(o) + 1]  # noqa: E731
    # proxy: 3 steps x 128 tokens; 8x the tokens -> 128 x 8^0.383 = 284 -> 256 tokens per step
    assert (opt("--ref-batch-size"), opt("--ref-tokens"), opt("--total-batch-size")) == ("128", "384", "256")
    assert opt("--depth") == "2" and opt("--target-tokens") == "3072" and "--num-iterations" not in cmd
    assert any("every LR x 1.414" in line for line in report["rules"])
    assert any("weight decay x 0.1768" in line for line in report["rules"])  # 2 x (1 / 8) / 1.414
    run = subprocess.run([sys.executable, *cmd[1:], "--out-dir", str(tmp_path / "big")], cwd=ROOT,
                         env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    s = json.load(open(tmp_path / "big" / "config.json"))["scaling"]
    assert (s["batch"], s["tokens"], s["lr_factor"]) == (256, 3072, pytest.approx(2 ** 0.5))
    assert s["wd_factor"] == pytest.approx(2 / 8 / 2 ** 0.5)


def test_batch_and_horizon_axes_run_each_point_with_its_shape(corpus, tmp_path):
    out = tmp_path / "shape"
    args = sweep_args(corpus, out, widths="32", mults="0", modes="mup", batches="128 256", horizons="512 1024")
    bad = subprocess.run(SWEEP + args, env=env(), capture_output=True, text=True)  # TRAIN's --num-iterations 3
    assert bad.returncode == 2 and "option --num-iterations is set by the sweep" in bad.stderr
    i = args.index("--num-iterations")
    args = args[:i] + args[i + 2:]
    r = subprocess.run(SWEEP + args, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in runs] == [f"mup_d1_w32_x0_s0_b{b}_t{t}" for b in (128, 256) for t in (1024, 512)]
    for run in runs:
        point, cfg = json.load(open(run / "point.json")), json.load(open(run / "config.json"))
        assert cfg["total_batch"] == point["batch"] and cfg["scaling"]["tokens"] == point["tokens"]
        assert len(metrics_of(run)) == point["tokens"] // point["batch"]
    rows = read_runs(str(out))[1]
    assert {(r["batch"], r["tokens"]) for r in rows} == {(b, t) for b in (128, 256) for t in (512, 1024)}
    assert json.load(open(out / "sweep.json"))["batches"] == [128, 256]


def metrics_of(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_payoff_runs_the_three_arms_with_their_tuned_values(swept, tmp_path):
    out, _ = swept
    pay = tmp_path / "payoff"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "payoff.py"), str(out), "--width", "64", "--seeds", "5 6",
           "--out", str(pay), "--n-boot", "100"]
    r = subprocess.run(cmd, env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(pay / "payoff.json"))
    s = summarize(read_runs(str(out))[1], "val_bpb", n_boot=10)
    want = {"mup": ("mup", 32, 32), "sp": ("sp", 64, 0), "mup_tuned": ("mup", 64, 32)}
    for arm, (mode, tuned_at, base) in want.items():
        x = s[mode, 1]["optima"][s[mode, 1]["values"].index(tuned_at)]
        assert res["tuned"][arm]["--matrix-lr"]["log2_mult"] == pytest.approx(x)
        runs = sorted((pay / arm).glob("*_s*"))
        assert len(runs) == 2
        for run in runs:  # every run trained at the target width with the arm's tuned value
            cfg = json.load(open(run / "config.json"))
            assert cfg["model_config"]["n_embd"] == 64 and cfg["model_config"]["mup_base_width"] == base
            assert cfg["args"]["matrix_lr"] == pytest.approx(0.02 * 2.0 ** x, rel=1e-5)
            assert cfg["args"]["num_iterations"] == 3
    vals = {a: np.array(v) for a, v in res["val_bpb"].items()}
    assert res["mup_minus_sp"]["mean"] == pytest.approx(vals["mup"].mean() - vals["sp"].mean())
    lo, hi = res["mup_minus_sp"]["ci"]
    assert lo <= res["mup_minus_sp"]["mean"] <= hi
    assert "muP transferred - SP tuned" in (pay / "payoff.md").read_text()
    again = subprocess.run(cmd + ["--report-only"], env=env(PYTHONPATH=ROOT), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "muP transferred - SP tuned" in again.stdout
    assert json.load(open(pay / "payoff.json"))["val_bpb"] == res["val_bpb"]
    more = subprocess.run(cmd[:5] + ["--seeds", "5 6 7", "--out", str(pay), "--report-only"],
                          env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert more.returncode == 0 and "mup: 2/3" in more.stdout, more.stdout  # counts only the seeds asked for
    # a second pass of the same hyperparameter overrides the first where it has runs (here: muP at the base width)
    second = second_pass(out, tmp_path / "pass2", "mup_d1_w32_*")
    r2 = subprocess.run(cmd[:3] + [str(second)] + cmd[3:] + ["--report-only"], env=env(PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr
    res2 = json.load(open(pay / "payoff.json"))
    assert res2["tuned"]["mup"]["--matrix-lr"]["log2_mult"] == 1
    assert res2["tuned"]["sp"] == res["tuned"]["sp"] and res2["tuned"]["mup_tuned"] == res["tuned"]["mup_tuned"]
    bad = subprocess.run(cmd[:5] + ["--seeds", "5", "--out", str(pay)], env=env(PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--seeds" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # a sweep with a shard still running (a run without DONE) or a point not run yet is refused, not fitted
    run = sorted(out.glob("sp_d1_w64_*"))[0]
    (run / "DONE").rename(run / "DONE.bak")
    r3 = subprocess.run(cmd + ["--report-only"], env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert r3.returncode == 2 and "not finished" in r3.stderr and len(r3.stderr.strip().splitlines()) == 1, r3.stderr
    (run / "DONE.bak").rename(run / "DONE")
    extra = out / (run.name[:-1] + "1")  # a seed-1 run at one multiplier only: the other seed-1 points are missing
    shutil.copytree(run, extra)
    (extra / "point.json").write_text(json.dumps({**json.load(open(run / "point.json")), "seed": 1}))
    r3 = subprocess.run(cmd + ["--report-only"], env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    shutil.rmtree(extra)
    assert r3.returncode == 2 and "sp width 64 has no run" in r3.stderr, r3.stderr


def test_payoff_of_the_batch_and_horizon_rules(swept, tmp_path):
    out, _ = swept
    pay = tmp_path / "rules"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "payoff.py"), str(out), "--seeds", "5 6",
                        "--out", str(pay), "--n-boot", "100", "--target-batch", "256", "--target-tokens", "768"],
                       env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(pay / "payoff.json"))
    assert res["proxy"] == dict(batch=128, tokens=384) and res["target"] == dict(batch=256, tokens=768)
    s = summarize(read_runs(str(out))[1], "val_bpb", n_boot=10)
    x = s["mup", 1]["optima"][s["mup", 1]["values"].index(32)]  # tuned at the base width, on the proxy's shape
    want = dict(rules=(2 ** 0.5, 2 * (384 / 768) / 2 ** 0.5), plain=(1.0, 1.0))
    for arm, (lr, wd) in want.items():
        runs = sorted((pay / arm).glob("mup_d1_w32_*"))
        assert len(runs) == 2
        for run in runs:
            cfg = json.load(open(run / "config.json"))
            assert cfg["args"]["matrix_lr"] == pytest.approx(0.02 * 2.0 ** x, rel=1e-5)
            assert (cfg["total_batch"], cfg["scaling"]["tokens"]) == (256, 768)
            assert (cfg["scaling"]["lr_factor"], cfg["scaling"]["wd_factor"]) == (pytest.approx(lr), pytest.approx(wd))
    vals = {a: np.array(v) for a, v in res["val_bpb"].items()}
    assert res["rules_minus_plain"]["mean"] == pytest.approx(vals["rules"].mean() - vals["plain"].mean())
    assert "with the batch and horizon rules - without" in (pay / "payoff.md").read_text()


def test_depth_rule_axis_runs_each_alpha_and_the_depth_report_reads_it(corpus, tmp_path):
    # --alphas "0 1" at depth 2: no depth rule (depth 2 is its own base) and CompleteP from base depth 1; 2 runs
    out = tmp_path / "depth"
    args = sweep_args(corpus, out, widths="32", mults="0", depths="2", alphas="0 1", modes="mup", **{"base-depth": "1"})
    r = subprocess.run(SWEEP + args, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for alpha in (0, 1):
        run = out / f"mup_d2_w32_x0_s0_a{alpha}"
        point, cfg = json.load(open(run / "point.json")), json.load(open(run / "config.json"))["model_config"]
        assert point["alpha"] == alpha and (run / "DONE").read_text().strip() == "ok"
        assert (cfg["depth_alpha"], cfg["mup_base_n_layer"]) == ((1.0, 1) if alpha else (0.0, 2))
    rep = tmp_path / "rep"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "depth_sweep_report.py"), str(out), "--out",
                        str(rep)], env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("| muon | ") for line in open(f"{rep}.md")) == 2  # 2 rules x 1 depth
    assert json.load(open(f"{rep}.json"))["spread"] == {}  # one depth: nothing to spread over
    other = tmp_path / "other"  # the same sweep from another base LR: its multipliers mean other LRs
    shutil.copytree(out, other)
    meta = json.load(open(other / "sweep.json"))
    (other / "sweep.json").write_text(json.dumps({**meta, "base": {k: 2 * v for k, v in meta["base"].items()}}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "depth_sweep_report.py"), str(out), str(other),
                        "--out", str(rep)], env=env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "one base value" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run(SWEEP + sweep_args(corpus, tmp_path / "bad", alphas="0 1"), env=env(), capture_output=True,
                       text=True, timeout=60)  # sp and mup: a depth rule needs muP
    assert r.returncode == 2 and "pass --modes mup" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def fake_depth_sweep(out, drift, depths=(2, 8, 32), mults=(-2, -1, 0, 1, 2, 3), seeds=(0, 1, 2)):
    """Finished run directories of a Muon depth sweep whose loss is (x - drift * log2(depth / 2))^2 + seed noise."""
    rng = np.random.default_rng(1)
    os.makedirs(out)
    (out / "sweep.json").write_text(json.dumps({"hp": "matrix_lr", "options": ["--matrix-lr"],
                                                "base": {"--matrix-lr": 0.02}, "extra": [], "alphas": [0.0]}))
    for d in depths:
        for x in mults:
            for s in seeds:
                run = out / f"mup_d{d}_w64_x{x}_s{s}_a0"
                os.makedirs(run)
                (run / "point.json").write_text(json.dumps(dict(mode="mup", depth=d, width=64, x=x, seed=s, alpha=0)))
                args = dict(matrix_optimizer="muon", num_iterations=10, device_batch_size=2, sequence_len=8)
                (run / "config.json").write_text(json.dumps({"args": args, "model_config": {"mup_base_width": 64}}))
                loss = (x - drift * math.log2(d / 2)) ** 2 + 0.05 * rng.normal()
                (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "train_loss": loss, "val_bpb": loss}) + "\n")
                (run / "DONE").write_text("ok\n")


@pytest.mark.parametrize("drift", [0.0, 0.5])
def test_depth_report_recovers_a_known_optimum_drift_with_depth(tmp_path, drift):
    fake_depth_sweep(tmp_path / "sweep", drift)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "depth_sweep_report.py"), str(tmp_path / "sweep"),
                        "--out", str(tmp_path / "rep")], env=env(PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.load(open(tmp_path / "rep.json"))
    b, lo, hi = rep["slopes"]["muon/none/w64"]
    assert set(rep["spread"]) == {"muon/none/w64"}
    assert b == pytest.approx(drift, abs=0.1) and lo <= drift <= hi and hi - lo < 0.5
    assert (lo > 0) == (drift > 0)  # a real drift is told from none
    assert [r["depth"] for r in rep["rows"]] == [2, 8, 32]
    assert all(r["base_bpb"] == r["mean_bpb"][2] for r in rep["rows"])


def test_fit_recovers_a_known_optimum_drift_and_its_interval():
    # loss = (x - x*(w))^2 + seed noise, with x*(w) = 0.5 * log2(w / 64): slope 0.5; a diverged point counts as +inf
    assert fit_optimum([-1, 0, 1, 2], [2.25, 0.25, 0.25, 2.25]) == pytest.approx(0.5)
    assert fit_optimum([-1, 0, 1], [3.0, 2.0, 1.0]) == 1  # best at the edge: the edge itself
    rng = np.random.default_rng(0)
    rows = [dict(mode=mode, depth=2, width=w, seed=s, x=x,
                 val_bpb=math.inf if x == 3 and w == 256 else (x - k * math.log2(w / 64)) ** 2 + 0.01 * rng.normal())
            for mode, k in (("mup", 0.0), ("sp", 0.5)) for w in (64, 128, 256) for s in range(3)
            for x in (-2, -1, 0, 1, 2, 3)]
    s = summarize(rows, "val_bpb", n_boot=200)
    assert s["sp", 2]["slope"] == pytest.approx(0.5, abs=0.05) and s["sp", 2]["slope_ci"][0] > 0.3
    mup = s["mup", 2]
    assert abs(mup["slope"]) < 0.05 and mup["slope_ci"][0] <= 0 <= mup["slope_ci"][1]
    assert all(lo <= o <= hi for o, (lo, hi) in zip(mup["optima"], mup["optima_ci"]))
    x, how = recommend(mup, 64, 1024)
    assert abs(x) < 0.05 and how.startswith("mean")
    x, how = recommend(s["sp", 2], 64, 1024)  # SP drifts: extrapolate the line to width 1024 (x* = 2)
    assert x == pytest.approx(2.0, abs=0.2) and how.startswith("fitted line")


@pytest.mark.parametrize("mup", [0, 32])
def test_init_scale_multiplies_every_init_std_but_the_scalars_and_gates(mup):
    import torch

    from nanochat.gpt import GPTConfig, build_model

    models = []
    for scale in (1.0, 2.5):
        torch.manual_seed(0)
        cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=64,
                        mup_base_width=mup, init_scale=scale)
        models.append(dict(build_model(cfg, "cpu").named_parameters()))
    for name, p in models[0].items():
        q = models[1][name]
        fixed = name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda") or "gate" in name
        want = p if fixed else 2.5 * p  # same draws, scaled
        assert torch.allclose(q, want), name
    assert models[0]["transformer.wte.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="init_scale"):
        GPTConfig(init_scale=0.0)
