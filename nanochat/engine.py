"""
Generation (nanochat's engine, minus batching and tools): a KV cache and a sampling loop over a GPT.
"""

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every position seen so far, per layer, for generation (nanochat's engine, minus
    batching): `pos` tokens are stored; GPT.forward appends its input's and advances `pos`. `last_embedding`: the
    last position's normalised token embedding, which the smear gate mixes into the next position."""

    def __init__(self, n_layer, max_len):
        self.max_len, self.pos = max_len, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.last_embedding = None

    def update(self, layer, k, v):
        """Store (B, T, H_kv, D) k, v at positions pos..pos+T-1 of `layer`; return the keys and values so far."""
        if self.k[layer] is None:  # allocated on first use: the dtype is whatever the forward computes in
            B, _, H, D = k.shape
            self.k[layer] = k.new_empty(B, self.max_len, H, D)
            self.v[layer] = v.new_empty(B, self.max_len, H, D)
        end = self.pos + k.size(1)
        self.k[layer][:, self.pos:end] = k
        self.v[layer][:, self.pos:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


@torch.no_grad()
def generate(model, tokens, max_tokens, temperature=1.0, top_k=None, seed=42, use_cache=True):
    """Sample continuation token ids of a list of prompt ids from a GPT. With the KV cache each step feeds only the
    new token. The context is the last sequence_len tokens: once longer, every position shifts each step,
    so from then on each token takes a full forward over that window (with or without the cache)."""
    device = model.cos.device
    L = model.config.sequence_len
    rng = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    cache = KVCache(model.config.n_layer, L) if use_cache else None
    out = []
    for _ in range(max_tokens):
        if cache is not None and ids.size(1) <= L:
            logits = model(ids[:, cache.pos:], kv_cache=cache)[:, -1, :]
        else:
            logits = model(ids[:, -L:])[:, -1, :]
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=rng)
        ids = torch.cat([ids, nxt], dim=1)
        out.append(nxt.item())
    return out


def sample_texts(model, tokenizer, prompts, seed, max_tokens=48, temperature=0.8, top_k=50):
    """Each prompt followed by a sampled continuation, decoded (prompt i samples with seed + i); None when the
    logits were not finite (torch.multinomial refuses nan/inf probabilities)."""
    texts = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        try:
            out = generate(model, ids, max_tokens, temperature, top_k, seed=seed + i)
        except RuntimeError as e:
            if "probability tensor" not in str(e):
                raise
            return None
        texts.append(tokenizer.decode(ids[1:] + out))
    return texts
