"""
The GPU check, built for a lent machine and one call (scripts/gpu_check.sh picks the python; README: "On a GPU"):
a preflight, a fail-fast smoke, then measurements, each written to --out the moment it exists, within a time budget.
No install, no network: data and tokenizer come from a bundle made beforehand on any machine with --prepare.

    bash scripts/gpu_check.sh --prepare .cache/gpu_bundle                      # CPU machine: shards + tokenizer
    bash scripts/gpu_check.sh --bundle .cache/gpu_bundle --out DIR             # the GPU machine
    GPU_CHECK_DRY=1 bash scripts/gpu_check.sh --bundle DIR --out DIR2          # every stage's plumbing on CPU

Stages, in order, with the seconds each is given on a 16-core H100 host (estimates: unmeasured until a first run):
  preflight   one-line errors: CUDA visible, the driver's CUDA vs torch's, a C compiler and Python.h (Triton builds
              its launcher with them at the first launch), Triton, the bundle
  smoke   120 fail fast: one Triton launch; attention fwd+bwd vs SDPA (bf16, head_dim 64 and 128, GQA, a window);
              the fused head fwd+bwd vs eager; 3 compiled bf16 base_train steps on both kernels
  train   180 compiled bf16 base_train at a d12-like shape with `auto` (the checked kernel choice): tokens/s, MFU;
              with several GPUs, on all of them under torchrun
  attention 120 scripts/bench_attention.py: TFLOP/s vs SDPA (flash, cuDNN) and flex_attention, causal and a
              window, T 2k, 8k, 4k, 1k (in that order, until its share of the time is spent)
  head     50 scripts/bench_head.py: time and peak memory vs eager, compiled, chunked and F.linear_cross_entropy
  slow     60+ the slow test tier (pytest -m slow) with whatever time is left
A stage whose seconds do not fit what is left of --budget-s is skipped and listed as skipped; a stage still running
at the budget's end is stopped. Writes to --out: gpu_check.md (the report, rewritten after every stage), train.log,
train_metrics.jsonl, bench_attention.md/.png, bench_head.md, tests_slow.log. Exit 0 when nothing failed, 1 when a
stage failed (a failed smoke stops the rest), 2 on bad input or a failed preflight (one line).

GPU_CHECK_DRY=1 (set by gpu_check.sh's caller): no GPU; tiny shapes, Triton's interpreter, no compile, the CPU's
slow tests. GPU_CHECK_FAIL=<triton|attention|head|train>: that smoke step fails (to test the fail-fast).
"""

import ctypes
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nanochat.common import ArgParser, atomic_write_text  # noqa: E402  (torch-free)

DRY = os.environ.get("GPU_CHECK_DRY") == "1"
FAIL = os.environ.get("GPU_CHECK_FAIL", "")
if DRY:  # the kernels in Triton's interpreter: set before Triton is imported, here and in every child process
    os.environ["TRITON_INTERPRET"] = "1"
else:  # compiled kernels, whatever the caller's shell says
    os.environ.pop("TRITON_INTERPRET", None)
BUNDLE_MAX = 20 * 2**20  # bytes: the bundle travels with the working tree (64 MiB in all)
# seconds per stage: (GPU, dry run); the slow tier's is the least worth starting, and it gets all that is left
SECONDS = dict(smoke=(120, 60), train=(180, 30), attention=(120, 40), head=(50, 40), slow=(60, 300))
STAGES = ("preflight", "smoke", "train", "attention", "head", "slow")

# -----------------------------------------------------------------------------
# options

parser = ArgParser(prog="gpu_check.sh", description="the GPU check for a lent machine, or --prepare its bundle")
parser.add("--prepare", default=None, path="out", help="write a bundle (shards + tokenizer) to this directory")
parser.add("--data-dir", default=None, path="dir", help="--prepare: shards to bundle (default: the Shakespeare corpus)")
parser.add("--vocab-size", type=int, default=32768, min=258, help="--prepare: tokenizer vocab (d12-like: 32768)")
parser.add("--bundle", default=None, path="dir", fix="make one with `bash scripts/gpu_check.sh --prepare DIR`",
           help="the bundle to check with")
parser.add("--budget-s", type=float, default=480, above=0, help="seconds for all stages (default: 8 minutes)")
parser.add("--out", default=None, path="out", help="result directory (default: dev/gpu/<date>-<gpu>)")
args = parser.parse_args()
if bool(args.prepare) == bool(args.bundle):
    parser.error("pass one of --prepare DIR (on any machine with the package index) or --bundle DIR (on the GPU)")
T0 = time.time()


def fail(message):
    """Bad input or a failed preflight: one line, exit 2."""
    print(f"gpu_check.sh: {message}", file=sys.stderr)
    sys.exit(2)


def run(cmd, log=None, timeout=None, env=None):
    """Run cmd from the repo root, its output shown as it comes and appended to `log`; returncode, or None when it was
    stopped at `timeout` seconds (its whole process group)."""
    out = open(log, "a") if log else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, env=dict(os.environ, **(env or {})))
    stopped = threading.Event()

    def stop():
        stopped.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, stop) if timeout else None
    if timer:
        timer.start()
    for line in proc.stdout:
        print(line, end="", flush=True)
        if out:
            out.write(line)
    proc.wait()
    if timer:
        timer.cancel()
    if out:
        out.close()
    return None if stopped.is_set() else proc.returncode


def tail(path, n=40):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# -----------------------------------------------------------------------------
# --prepare: the bundle (shards + tokenizer, with a manifest of sizes and hashes)


def manifest(root):
    files = {}
    for d, _, names in os.walk(root):
        for name in sorted(names):
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if rel != "bundle.json":
                with open(path, "rb") as f:
                    files[rel] = dict(bytes=os.path.getsize(path), sha256=hashlib.sha256(f.read()).hexdigest())
    return files


if args.prepare:
    out = os.path.abspath(args.prepare)
    if os.path.exists(out) and os.listdir(out):
        fail(f"--prepare={args.prepare}: not empty: pass a new directory")
    data, tok = os.path.join(out, "data"), os.path.join(out, "tokenizer")
    if args.data_dir:
        os.makedirs(data)
        for name in sorted(os.listdir(args.data_dir)):
            if name.startswith("shard_") or name == "COPYING.txt":
                shutil.copy(os.path.join(args.data_dir, name), data)
    elif run([sys.executable, "-m", "nanochat.dataset", "shakespeare", "--out", data]) != 0:
        fail("--prepare: `python -m nanochat.dataset shakespeare` failed (above)")
    if run([sys.executable, "scripts/tok_train.py", "--vocab-size", str(args.vocab_size), "--data-dir", data,
            "--out", tok]) != 0:
        fail("--prepare: scripts/tok_train.py failed (above)")
    files = manifest(out)
    size = sum(f["bytes"] for f in files.values())
    if size > BUNDLE_MAX:
        fail(f"--prepare: the bundle is {size / 2**20:.1f} MiB, over {BUNDLE_MAX / 2**20:.0f} MiB: bundle fewer shards "
             "(--data-dir) or a smaller --vocab-size")
    atomic_write_text(os.path.join(out, "bundle.json"), json.dumps(dict(
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), vocab_size=args.vocab_size,
        files=files), indent=2))
    print(f"bundle {out}: {len(files)} files, {size / 2**20:.2f} MiB ({size:,} bytes)")
    sys.exit(0)

# -----------------------------------------------------------------------------
# preflight: every way the check could fail before it measures anything, each as one line


def check_bundle(root):
    path = os.path.join(root, "bundle.json")
    try:
        with open(path) as f:
            want = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        fail(f"--bundle={args.bundle}: no readable bundle.json: make one with "
             "`bash scripts/gpu_check.sh --prepare DIR`")
    have = manifest(root)
    for rel, meta in want.items():
        if have.get(rel) != meta:
            what = "changed" if rel in have else "missing"
            fail(f"--bundle={args.bundle}: {rel} is {what}: prepare the bundle again")
    return sum(m["bytes"] for m in want.values())


def cuda_driver_version():
    """(major, minor) of the CUDA version the installed driver supports, from libcuda itself; None without one."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return None
    return v.value // 1000, v.value % 1000 // 10


def preflight():
    bundle_bytes = check_bundle(args.bundle)
    for name in ("torch", "triton"):
        if importlib.util.find_spec(name) is None:
            fail(f"{sys.executable} has no {name}: run with a python that has CUDA torch and Triton (PYTHON=...)")
    import torch
    import triton

    lines = [f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} (CUDA build "
             f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}"]
    if not DRY:
        if not torch.cuda.is_available():
            fail("no CUDA GPU visible to torch (torch.cuda.is_available() is False): check the driver and "
                 "CUDA_VISIBLE_DEVICES")
        driver, built = cuda_driver_version(), tuple(int(x) for x in torch.version.cuda.split(".")[:2])
        if driver is None or driver[0] < built[0]:
            fail(f"the driver supports CUDA {driver and '.'.join(map(str, driver))}, torch was built for CUDA "
                 f"{torch.version.cuda}: update the driver or use a torch built for the driver's CUDA")
        p = torch.cuda.get_device_properties(0)
        from nanochat.common import peak_bf16_flops

        peak = peak_bf16_flops(torch.device("cuda", 0))
        lines.append(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.0f} GiB; driver CUDA {'.'.join(map(str, driver))}"
                     + (" (older minor than torch's: minor-version compatibility)" if driver < built else ""))
        lines.append("MFU peak: " + (f"{peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "unknown GPU: MFU not shown"))
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")  # what Triton's launcher build takes
    if not cc:
        fail("no C compiler (gcc, clang or $CC): Triton compiles its launcher at the first launch: install gcc")
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        fail(f"no Python.h in {include}: Triton compiles its launcher against it: install the Python headers "
             f"(python{sys.version_info.major}.{sys.version_info.minor}-dev)")
    lines.append(f"C compiler {cc}; Python.h in {include}; {os.cpu_count()} CPU cores")
    lines.append(f"bundle {args.bundle}: {bundle_bytes / 2**20:.2f} MiB")
    return lines


# -----------------------------------------------------------------------------
# report: rewritten after every stage, so a call cut short still returns what was done

results = {}  # stage -> dict(result, seconds, notes, body)
env_lines = preflight()
import torch  # noqa: E402  (after the preflight: its failures are one line)

device = torch.device("cpu" if DRY else "cuda")
gpu = "CPU (dry run)" if DRY else torch.cuda.get_device_name(0)
slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
OUT = os.path.abspath(args.out or os.path.join(ROOT, "dev", "gpu", f"{datetime.date.today()}-{slug}"))
os.makedirs(OUT, exist_ok=True)
TMP = tempfile.mkdtemp(prefix="gpu_check_")
BUNDLE = os.path.abspath(args.bundle)
DATA = ["--data-dir", os.path.join(BUNDLE, "data"), "--tokenizer-dir", os.path.join(BUNDLE, "tokenizer")]
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode:
        commit += " with uncommitted changes"
except (OSError, subprocess.CalledProcessError):
    commit = "unknown (no git here)"


def write_report():
    failed = [s for s, r in results.items() if r["result"].startswith("FAIL")]
    lines = [f"# GPU check: {gpu}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
             f"`bash scripts/gpu_check.sh {' '.join(sys.argv[1:])}`{' (GPU_CHECK_DRY=1: plumbing only)' * DRY}, "
             f"commit {commit}, budget {args.budget_s:g} s, {time.time() - T0:.0f} s so far.", "",
             "Result: " + (f"FAILED ({', '.join(failed)})" if failed else "no stage failed") + ".", "",
             "## Environment", "", *[f"- {line}" for line in env_lines], "",
             "| stage | result | seconds | notes |", "|---|---|---|---|"]
    lines += [f"| {s} | {r['result']} | {r['seconds']:.0f} | {r['notes']} |" for s, r in results.items()]
    for s, r in results.items():
        if r.get("body"):
            lines += ["", f"## {s}", "", r["body"]]
    atomic_write_text(os.path.join(OUT, "gpu_check.md"), "\n".join(lines) + "\n")


def left():
    return args.budget_s - (time.time() - T0)


# -----------------------------------------------------------------------------
# smoke: the first launch and a few checks, each of which stops the whole check when it fails

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def smoke_triton():
    x = torch.arange(1000, device=device, dtype=torch.float32)
    add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
    assert torch.equal(x.cpu(), torch.arange(1, 1001, dtype=torch.float32)), "the kernel wrote wrong values"
    return "add_one over 1000 elements: exact"


def smoke_attention():
    from nanochat.kernel_choice import check_attention, correct

    out = []
    cases = [(32, 2, None), (32, 4, 20)] if DRY else [(64, 2, None), (128, 4, 100), (128, 1, None)]
    for D, group, window in cases:
        errs, ref = check_attention(torch.bfloat16, 64 if DRY else 200, group, D, window, D**-0.5, device)
        line = (f"bf16 head_dim {D} GQA {group}:1 window {window}: " +
                ", ".join(f"{k} {errs[k]:.1e} (sdpa {ref[k]:.1e})" for k in errs))
        assert correct(errs, ref), "outside 2x SDPA's error + 1e-5: " + line
        out.append(line)
    return "\n".join(out)


def smoke_head():
    from nanochat.kernel_choice import check_head, correct

    errs, ref = check_head(torch.bfloat16, 64 if DRY else 768, 512 if DRY else 32768, 0.25, 15.0, device)
    line = "bf16: " + ", ".join(f"{k} {errs[k]:.1e} (eager {ref[k]:.1e})" for k in errs)
    assert correct(errs, ref), "outside 2x eager's error + 1e-5: " + line
    return line


def smoke_train():
    shape = (["--depth", "2", "--n-embd", "64", "--n-head", "2", "--sequence-len", "32", "--device-batch-size", "2",
              "--short-window", "16", "--compile", "0", "--device", "cpu"] if DRY else
             ["--depth", "2", "--n-embd", "512", "--head-dim", "128", "--sequence-len", "512",
              "--device-batch-size", "8", "--compile", "1"])
    out = os.path.join(TMP, "smoke_run")
    log = os.path.join(TMP, "smoke_train.log")
    rc = run([sys.executable, "scripts/base_train.py", *shape, "--n-kv-head", "1", "--window-pattern", "SL",
              "--dtype", "bfloat16", "--attn-impl", "triton", "--head-impl", "triton", "--num-iterations", "3",
              "--eval-every", "0", "--eval-tokens", "2048", "--out-dir", out, *DATA], log, timeout=max(left(), 1))
    assert rc == 0, f"base_train exited {rc}:\n{tail(log, 15)}"
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = [r["train_loss"] for r in rows]
    assert len(losses) == 3, losses
    choices = [line for line in open(log) if line.startswith("kernel choice:")]
    return "\n".join([f"3 steps, losses {', '.join(f'{x:.3f}' for x in losses)}, val bpb {rows[-1]['val_bpb']:.3f}",
                      *[c.strip() for c in choices]])


def smoke():
    lines, t0 = [], time.time()
    for name, step in (("triton", smoke_triton), ("attention", smoke_attention), ("head", smoke_head),
                       ("train", smoke_train)):
        try:
            if FAIL == name:
                raise AssertionError("injected failure (GPU_CHECK_FAIL)")
            lines.append(f"{name}: pass: {step()}")
        except Exception as e:  # any failure stops the check here; its message is the report's
            lines.append(f"{name}: FAIL: {type(e).__name__}: {e}")
            return f"FAIL ({name})", "", "```\n" + "\n".join(lines) + "\n```"
        print(lines[-1], flush=True)
        print(f"[smoke {name} done after {time.time() - t0:.0f} s]", flush=True)
    return "pass", "", "```\n" + "\n".join(lines) + "\n```"


# -----------------------------------------------------------------------------
# measurements


def train():
    """Compiled bf16 base_train at a d12-like shape (auto: the checked kernel choice); steady-state tokens/s and MFU."""
    shape = (["--depth", "2", "--n-embd", "64", "--n-head", "2", "--sequence-len", "64", "--device-batch-size", "4",
              "--short-window", "16", "--num-iterations", "6", "--compile", "0", "--device", "cpu",
              "--dtype", "float32"] if DRY else
             ["--depth", "12", "--aspect-ratio", "64", "--head-dim", "128", "--sequence-len", "2048",
              "--device-batch-size", "32", "--num-iterations", "40", "--compile", "1", "--dtype", "bfloat16"])
    out, log = os.path.join(TMP, "train_run"), os.path.join(OUT, "train.log")
    gpus = 0 if DRY else torch.cuda.device_count()  # several: every one, under torchrun (the sharded optimizer)
    launch = [sys.executable] + ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] * (gpus > 1)
    rc = run([*launch, "scripts/base_train.py", *shape, "--window-pattern", "SSSL", "--eval-every", "0",
              "--eval-tokens", "65536" if not DRY else "512", "--out-dir", out, *DATA], log, timeout=max(left(), 1))
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        shutil.copy(metrics, os.path.join(OUT, "train_metrics.jsonl"))
    if rc != 0:
        return ("timed out" if rc is None else f"FAIL (exit {rc})"), "", f"```\n{tail(log)}```"
    rows = [json.loads(line) for line in open(metrics)]
    steady = rows[len(rows) // 4:] if DRY else rows[10:]  # after compilation and warm-up
    tok = statistics.median(r["tok_per_s"] for r in steady)
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    note = f"{tok:,.0f} tokens/s" + (f", MFU {100 * statistics.median(mfu):.1f}%" if mfu else ", MFU n/a")
    config = json.load(open(os.path.join(out, "config.json")))
    body = [f"{' '.join(shape)} --window-pattern SSSL on {max(gpus, 1)} device(s): {len(rows)} steps of "
            f"{config['total_batch']:,} "
            f"tokens; median of steps {steady[0]['step']}-{steady[-1]['step']}: {note}; final val bpb "
            f"{rows[-1].get('val_bpb', float('nan')):.4f}", "", "```",
            *[line.strip() for line in open(log) if line.startswith(("kernel choice:", "done:"))], "```"]
    return "pass", note, "\n".join(body)


def bench_attention():
    shape = (["--batch", "1", "--heads", "2", "--head-dim", "32", "--seqlens", "64"] if DRY else
             ["--seqlens", "2048", "8192", "4096", "1024"])
    log = os.path.join(TMP, "bench_attention.log")
    share = SECONDS["attention"][DRY]
    rc = run([sys.executable, "scripts/bench_attention.py", *shape, "--out-dir", OUT, "--deadline-s",
              str(max(share - 30, 1))], log, timeout=max(left(), 1))
    md = os.path.join(OUT, "bench_attention.md")
    rows = sum(1 for line in open(md) if line.startswith("| ") and "---" not in line) - 1 if os.path.exists(md) else 0
    result = "pass" if rc == 0 else "timed out" if rc is None else f"FAIL (exit {rc})"
    return result, f"{rows} rows in bench_attention.md", f"```\n{tail(log, 12)}```"


def bench_head():
    shape = (["--device", "cpu", "--N", "256", "--d", "64", "--V", "512", "--iters", "1", "--dtype", "bfloat16",
              "--cases", "eager", "triton"] if DRY else ["--device", "cuda"])
    log = os.path.join(TMP, "bench_head.log")
    rc = run([sys.executable, "scripts/bench_head.py", *shape, "--out", os.path.join(OUT, "bench_head.md")], log,
             timeout=max(left(), 1))
    result = "pass" if rc == 0 else "timed out" if rc is None else f"FAIL (exit {rc})"
    return result, "bench_head.md", f"```\n{tail(log, 12)}```"


def slow_tests():
    log = os.path.join(OUT, "tests_slow.log")
    rc = run([sys.executable, "-m", "pytest", "-m", "slow", "-q", "-p", "no:cacheprovider"], log,
             timeout=max(left() - 5, 1))
    summary = [line for line in tail(log, 5).splitlines() if " in " in line and ("passed" in line or "failed" in line)]
    result = "pass" if rc == 0 else "stopped at the budget" if rc is None else f"FAIL (exit {rc})"
    return result, (summary or ["see tests_slow.log"])[-1].strip("= "), f"```\n{tail(log, 25)}```"


# -----------------------------------------------------------------------------
# the stages, in order: skipped when their time does not fit, all stopped by a failed smoke

results["preflight"] = dict(result="pass", seconds=time.time() - T0, notes="", body="")
write_report()
steps = dict(smoke=smoke, train=train, attention=bench_attention, head=bench_head, slow=slow_tests)
stopped = None
for stage in STAGES[1:]:
    need = SECONDS[stage][DRY]
    if stopped:
        results[stage] = dict(result="not run", seconds=0, notes=f"the {stopped} failed", body="")
    elif need > left():
        results[stage] = dict(result="skipped", seconds=0, body="",
                              notes=f"needs ~{need} s, {max(left(), 0):.0f} s of the {args.budget_s:g} s budget left")
    else:
        print(f"=== {stage} ({left():.0f} s of the budget left)", flush=True)
        t0 = time.time()
        result, notes, body = steps[stage]()
        results[stage] = dict(result=result, seconds=time.time() - t0, notes=notes, body=body)
        if stage == "smoke" and result != "pass":
            stopped = "smoke"
    write_report()
shutil.rmtree(TMP, ignore_errors=True)
failed = [s for s, r in results.items() if r["result"].startswith("FAIL")]
print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'no stage failed'}; report {OUT}/gpu_check.md "
      f"({time.time() - T0:.0f} s)")
sys.exit(1 if failed else 0)
