"""
Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.
The Encoding is always built from our own learned ranks (tiktoken.get_encoding needs the network).
rustbpe is imported only to train: loading a trained tokenizer (training, sampling, the GPU check) needs tiktoken alone.
"""

import io
import os
import pickle

import tiktoken
import torch

from nanochat.common import atomic_write_bytes, get_base_dir

# GPT-4 style split, but numbers split into groups of at most 2 digits (as nanochat: fewer
# number tokens wasted in a small vocab)
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>"]  # ids appended right after the learned ranks


def tokenizer_dir(name="default"):
    return os.path.join(get_base_dir(), "tokenizer", name)


class Tokenizer:
    def __init__(self, pattern, mergeable_ranks):
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        n = len(mergeable_ranks)
        special = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanochat-mup", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special
        )
        self.bos_id = special["<|bos|>"]

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        n_learned = vocab_size - len(SPECIAL_TOKENS)
        if n_learned < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: use >= 256 + {len(SPECIAL_TOKENS)}")
        try:
            import rustbpe
        except ImportError:
            raise ImportError("training a tokenizer needs rustbpe, which is not installed: pip install rustbpe "
                              "(or load a trained one with Tokenizer.load)") from None
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(text_iterator, n_learned, pattern=SPLIT_PATTERN)
        ranks = {bytes(b): rank for b, rank in tok.get_mergeable_ranks()}
        return cls(tok.get_pattern(), ranks)

    @classmethod
    def load(cls, directory):
        path = os.path.join(directory, "tokenizer.pkl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer in {directory}: run `python scripts/tok_train.py` first")
        with open(path, "rb") as f:
            d = pickle.load(f)
        if d["special_tokens"] != SPECIAL_TOKENS:
            raise ValueError(f"tokenizer in {directory} has special tokens {d['special_tokens']}, "
                             f"expected {SPECIAL_TOKENS}: retrain it with `python scripts/tok_train.py`")
        return cls(d["pattern"], d["mergeable_ranks"])

    def save(self, directory):
        d = dict(pattern=self.pattern, mergeable_ranks=self.mergeable_ranks, special_tokens=SPECIAL_TOKENS)
        atomic_write_bytes(os.path.join(directory, "tokenizer.pkl"), pickle.dumps(d))
        # per-token byte lengths travel with the tokenizer, for bits-per-byte evaluation
        buf = io.BytesIO()
        torch.save(self.token_bytes(), buf)
        atomic_write_bytes(os.path.join(directory, "token_bytes.pt"), buf.getvalue())

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_id

    def encode_special(self, name):
        return self.enc.encode_single_token(name)

    def token_bytes(self):
        # utf-8 byte length of each token; 0 for special tokens so they drop out of bits-per-byte
        n = len(self.mergeable_ranks)
        lengths = [len(self.enc.decode_single_token_bytes(i)) for i in range(n)] + [0] * len(SPECIAL_TOKENS)
        return torch.tensor(lengths, dtype=torch.int32)

    def encode(self, text, prepend=None, num_threads=8):
        # text: str -> list[int]; list[str] -> list[list[int]] (threaded). Special-token strings inside
        # the text are encoded as ordinary text, never as special tokens.
        if isinstance(prepend, str):
            prepend = self.encode_special(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        if isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return batch if prepend is None else [[prepend] + ids for ids in batch]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(directory, device="cpu"):
    path = os.path.join(directory, "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token_bytes.pt in {directory}: run `python scripts/tok_train.py` first")
    return torch.load(path, map_location=device)
