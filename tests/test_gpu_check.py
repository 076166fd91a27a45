"""scripts/gpu_check.sh where torch sees no CUDA GPU (CUDA hidden, so this holds on GPU machines too)."""

import os
import subprocess

from conftest import ROOT


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2():
    reports = os.path.join(ROOT, "dev", "gpu")
    before = sorted(os.listdir(reports)) if os.path.isdir(reports) else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["gpu_check.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is "
                                     "False); nothing to check"], r.stdout
    assert r.stderr == ""
    assert (sorted(os.listdir(reports)) if os.path.isdir(reports) else None) == before  # no report written
