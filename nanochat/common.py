"""Small helpers shared across the repo: cache dir, distributed info, atomic writes."""

import argparse
import os
import tempfile
from contextlib import contextmanager


def get_base_dir():
    # run-independent cache for data shards, tokenizers and downloads
    default = os.path.join(os.path.expanduser("~"), ".cache", "nanochat-mup")
    base = os.environ.get("NANOCHAT_BASE_DIR") or default
    os.makedirs(base, exist_ok=True)
    return base


def get_dist_info():
    # (ddp, rank, local_rank, world_size) from the env vars torchrun sets
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


@contextmanager
def atomic_path(path):
    # yields a temp path in the same dir (same filesystem, so os.replace is atomic); readers never
    # see a half-written file, and a crash leaves at most a stray .tmp file
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2, no usage dump) and both spellings of every option."""

    def add(self, name, **kw):
        names = [name] + ([name.replace("-", "_").replace("__", "--", 1)] if "-" in name[2:] else [])
        return self.add_argument(*names, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
