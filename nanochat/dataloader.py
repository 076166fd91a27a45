"""
Distributed, resumable, BOS-aligned data loader.

Reading: the split's parquet row groups are the units of order. Each epoch visits the units in a seeded
permutation (val: file order, no shuffling), the docs inside a unit are permuted too (train only), and rank r
keeps docs[r::world_size] of every unit. Striding docs rather than row groups means any number of ranks works
even on a tiny corpus or a one-row-group val shard; the cost is that every rank decodes every row group,
which is cheap next to tokenizing, which each rank only does for its own docs.

Packing (nanochat's best-fit, but cropped tails are kept): tokenized docs, each prefixed with BOS, wait in
a buffer. A row of T+1 tokens is filled by repeatedly taking the longest buffered doc that still fits whole;
when none fits, the longest doc is cut to fill the row exactly and its tail goes back into the buffer with a
BOS of its own. So every row starts with BOS, no token is padding and no token is dropped. nanochat drops
the tails, which is affordable on FineWeb but on Shakespeare (docs ~1100 tokens) would leave 82% of the
tokens unseen at T=256 and 31% at T=1024 (measured). Cutting the longest doc keeps short docs whole.

Resuming: state_dict() holds the read cursor (epoch, unit, doc) and the buffered token ids, so a loader
restored from it yields exactly the batches the original would have.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat.dataset import split_shards


class DataLoader:
    def __init__(self, tokenizer, data_dir, B, T, split="train", rank=0, world_size=1, device="cpu", seed=0,
                 buffer_docs=256, tokenizer_batch=128, num_threads=4):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.tokenizer, self.data_dir, self.B, self.T, self.split = tokenizer, data_dir, B, T, split
        self.rank, self.world_size, self.device, self.seed = rank, world_size, torch.device(device), seed
        self.buffer_docs, self.tokenizer_batch, self.num_threads = buffer_docs, tokenizer_batch, num_threads
        self.bos = tokenizer.get_bos_token_id()
        shards = split_shards(data_dir, split)
        self.units = [(p, i) for p in shards for i in range(pq.ParquetFile(p).num_row_groups)]  # row groups
        self.epoch, self.unit, self.doc = 0, 0, 0  # cursor: next doc to tokenize
        self.buffer = []  # tokenized docs (lists of ids, each starting with BOS) waiting to be packed
        self.order = self._order()
        self._cached = (None, None)

    def _order(self):
        if self.split == "val":
            return list(range(len(self.units)))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units)).tolist()

    def _docs(self):
        # this rank's docs of the current unit, read once and cached
        key = (self.epoch, self.unit)
        if self._cached[0] != key:
            u = self.order[self.unit]
            path, rg = self.units[u]
            texts = pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column("text").to_pylist()
            if self.split == "train":
                perm = np.random.default_rng([self.seed, self.epoch, u]).permutation(len(texts))
                texts = [texts[i] for i in perm]
            self._cached = (key, texts[self.rank::self.world_size])
        return self._cached[1]

    def _refill(self):
        texts, empty_units = [], 0
        while len(texts) < self.tokenizer_batch:
            docs = self._docs()
            if self.doc < len(docs):
                take = docs[self.doc:self.doc + self.tokenizer_batch - len(texts)]
                self.doc += len(take)
                texts += take
                empty_units = 0
                continue
            empty_units += 1
            if empty_units > len(self.units):
                raise ValueError(f"rank {self.rank} of {self.world_size} gets no documents of the "
                                 f"{self.split} split in {self.data_dir}: use fewer ranks or more data")
            self.unit, self.doc = self.unit + 1, 0
            if self.unit == len(self.units):  # next epoch, in a new order
                self.epoch, self.unit = self.epoch + 1, 0
                self.order = self._order()
        self.buffer += self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads)

    def next_batch(self):
        rows, buf = [], self.buffer
        for _ in range(self.B):
            row = []
            while len(row) < self.T + 1:
                while len(buf) < self.buffer_docs:
                    self._refill()
                room = self.T + 1 - len(row)
                fits = [i for i, d in enumerate(buf) if len(d) <= room]
                i = max(fits or range(len(buf)), key=lambda i: len(buf[i]))
                doc = buf.pop(i)
                row += doc[:room]
                if len(doc) > room:  # cut: the tail waits for a later row
                    buf.append([self.bos] + doc[room:])
            rows.append(row)
        batch = torch.tensor(rows, dtype=torch.int64)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if self.device.type == "cuda":
            # fresh pinned tensors each batch, so the async copy never races the next batch's fill
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
        return x.to(self.device), y.to(self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def snapshot(self):
        """The read position, cheap to take (buffered docs are never changed in place, so sharing them is safe)."""
        return self.epoch, self.unit, self.doc, list(self.buffer)

    def state_dict(self, snapshot=None):
        """The state at `snapshot` (default: now)."""
        epoch, unit, doc, buffer = snapshot or self.snapshot()
        return {
            "split": self.split, "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
            "epoch": epoch, "unit": unit, "doc": doc,
            "lengths": torch.tensor([len(d) for d in buffer], dtype=torch.int64),
            "tokens": torch.tensor([t for d in buffer for t in d], dtype=torch.int32),
        }

    def load_state_dict(self, state):
        for k in ("split", "rank", "world_size", "seed"):
            if state[k] != getattr(self, k):
                raise ValueError(f"loader state has {k}={state[k]!r} but this loader has "
                                 f"{getattr(self, k)!r}: resume with the same {k}")
        self.epoch, self.unit, self.doc = state["epoch"], state["unit"], state["doc"]
        self.buffer = [t.tolist() for t in state["tokens"].long().split(state["lengths"].tolist())]
        self.order = self._order()
        self._cached = (None, None)


class StepBatches:
    """This rank's share of every optimizer step's global batch, read through data streams so that the batch depends
    on the number of streams D and the rows per step G only, never on the world size M or the accumulation split.

    Stream s of D reads docs[s::D] and yields G / D consecutive rows per step. The step's rows are stream 0's, then
    stream 1's, ... and rank r takes rows [r*G/M, (r+1)*G/M) of them (its micro-step k the k-th device batch of
    those). So 2 ranks x 1 micro-step and 1 process x 2 micro-steps (D=2) take the same optimizer step up to float
    summation order, and a checkpoint's per-stream states continue on any M. A rank runs every stream it has rows
    from (a stream split between two ranks is read by both); the rank holding a stream's first row saves its state.
    G must be a multiple of D and of M.

    The next step's rows are read (tokenized, packed, pinned) in a background thread while the current step trains,
    so the GPU does not wait for the data between steps; state_dicts() is the position after the rows handed out."""

    def __init__(self, tokenizer, data_dir, T, rows_per_step, streams, rank, world_size, device, seed):
        per_stream, self.per_rank = rows_per_step // streams, rows_per_step // world_size
        mine = range(rank * self.per_rank // per_stream, ((rank + 1) * self.per_rank - 1) // per_stream + 1)
        self.offset = rank * self.per_rank - mine[0] * per_stream  # where this rank's rows start in its streams
        self.owned = [s for s in mine if s * per_stream // self.per_rank == rank]
        self.loaders = {s: DataLoader(tokenizer, data_dir, per_stream, T, "train", s, streams, "cpu", seed=seed)
                        for s in mine}
        self.device = torch.device(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.ahead = None  # the next step's read, in flight
        self.snapshots = [self.loaders[s].snapshot() for s in self.owned]  # of the rows handed out so far

    def _read(self):
        xs, ys = zip(*(loader.next_batch() for loader in self.loaders.values()))
        x, y = (torch.cat(t)[self.offset:self.offset + self.per_rank] for t in (xs, ys))
        if self.device.type == "cuda":  # pinned: the copy to the GPU then runs behind the queued work
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, [self.loaders[s].snapshot() for s in self.owned]

    def next(self):
        """This rank's (x, y) rows of the next step; starts reading the step after."""
        x, y, self.snapshots = (self.ahead or self.pool.submit(self._read)).result()
        self.ahead = self.pool.submit(self._read)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dicts(self):
        """The states of the streams this rank saves, after the rows handed out (not the ones read ahead)."""
        return [self.loaders[s].state_dict(snap) for s, snap in zip(self.owned, self.snapshots, strict=True)]

    def load_state_dicts(self, states):
        """Continue from {stream: state} (checkpoint.load_stream_states), whichever world size saved them."""
        if self.ahead:  # a read ahead of the old position is void
            self.ahead.result()
            self.ahead = None
        for s, loader in self.loaders.items():
            loader.load_state_dict(states[s])
        self.snapshots = [self.loaders[s].snapshot() for s in self.owned]


def global_batch(B, T, world_size, total_batch_size=0, resumed_total=0):
    """Tokens per optimizer step: --total-batch-size, else the resumed checkpoint's, else one pass of B x T per
    process. It must split into whole device batches on every process; if not, ValueError names what to pass."""
    per_pass = B * T * world_size
    total = total_batch_size or resumed_total or per_pass
    if total % per_pass == 0:
        return total
    rows = total // T
    if total % T or rows % world_size:
        fix = f"pick a multiple of {per_pass}" if total_batch_size else \
            f"use a number of processes that divides its {rows} sequences"
    else:  # the largest device batch <= B that splits this rank's rows evenly
        fix = f"use --device-batch-size {max(d for d in range(1, B + 1) if rows // world_size % d == 0)}"
    what = f"--total-batch-size={total}" if total_batch_size else f"the checkpoint's {total} tokens"
    raise ValueError(f"{what} is not divisible by device_batch_size*sequence_len*world_size = {B}*{T}*{world_size} "
                     f"= {per_pass}: {fix}")
