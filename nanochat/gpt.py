"""
GPT model with a one-field muP switch.

Architecture (nanochat-style): token embedding, rotary positions, QK-norm, parameter-free RMSNorm,
causal GQA attention with a per-layer sliding window, ReLU^2 MLP, per-layer residual scalars,
untied lm_head, tanh logit softcap, no biases.

`GPTConfig.mup_base_width = b > 0` turns on muP (Tensor Programs V, Yang et al. 2022) with width
multiplier m = n_embd / b: attention logits scaled by attn_mult/head_dim, lm_head zero-initialised
and its logits multiplied by output_mult/m, and the optimizer rules in `GPT.param_rules`.
`mup_base_width = 0` is the standard parametrization (SP). `depth_alpha > 0` adds the depth rule (CompleteP,
Dey et al. 2025, arXiv 2505.01618; alpha = 1/2 is Depth-muP, Yang et al. 2023): residual branches multiplied by
(L_base / L)^alpha and the depth factors in `GPT.param_rules`. See muP_changes.md for every rule.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import MuonAdamW

# nanochat's SP rule scales the AdamW learning rates by (n_embd / 768)^-0.5; muP freezes that factor
# at the base width so that base-width hyperparameters mean the same in both modes.
ADAMW_LR_REFERENCE_WIDTH = 768
DEFAULT_MATRIX_LR = {"muon": 0.02, "adamw": 0.003}


@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    window_pattern: str = "L"  # L = full causal, S = sequence_len // 2 past tokens; tiled, last layer L
    softcap: float = 15.0  # tanh logit cap; 0 disables it
    mup_base_width: int = 0  # 0 = SP; b > 0 = muP with width multiplier n_embd / b
    # the rest of the muP base (the model the hyperparameters were tuned at); 0 = resolved in __post_init__
    mup_base_head_dim: int = 0  # 0 = this head_dim (width grows through heads)
    mup_base_n_kv_head: int = 0  # 0 = n_head of the base if this model is MHA, else this kv-head count (fixed)
    mup_base_n_layer: int = 0  # 0 = n_layer; must equal n_layer unless depth_alpha > 0
    depth_alpha: float = 0.0  # depth rule: 0 = none (depth changes refused), 1 = CompleteP, 0.5 = Depth-muP
    attn_mult: float = 0.0  # muP attention logit scale is attn_mult / head_dim; 0 = sqrt(base head_dim)
    output_mult: float = 1.0  # muP logits are multiplied by output_mult / m
    init_scale: float = 1.0  # multiplies every init std (matrices, embedding, readout): a tunable base HP
    attn_impl: str = "auto"  # auto (Triton on CUDA, else SDPA), triton (kernels/attention.py), sdpa
    head_impl: str = "auto"  # auto (Triton on CUDA, else chunked), triton, chunked (kernels/head.py), eager

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name}={value!r}: must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig head_dim={self.head_dim} (n_embd/n_head) must be even for rotary")
        if not self.window_pattern or set(self.window_pattern) - {"L", "S"}:
            raise ValueError(f"GPTConfig.window_pattern={self.window_pattern!r}: use only 'L' and 'S' characters")
        if not isinstance(self.mup_base_width, int) or self.mup_base_width < 0:
            raise ValueError(f"GPTConfig.mup_base_width={self.mup_base_width!r}: must be 0 (SP) or a positive int")
        for name in ("softcap", "attn_mult", "output_mult", "init_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name in ("output_mult", "init_scale")):
                raise ValueError(f"GPTConfig.{name}={value!r}: must be a finite positive number")
        self._resolve_mup_base()
        if self.attn_impl not in ("auto", "triton", "sdpa"):
            raise ValueError(f"GPTConfig.attn_impl={self.attn_impl!r}: choose auto, triton or sdpa")
        if self.head_impl not in ("auto", "triton", "chunked", "eager"):
            raise ValueError(f"GPTConfig.head_impl={self.head_impl!r}: choose auto, triton, chunked or eager")

    def _resolve_mup_base(self):
        """Fill in the base fields (so config.json and checkpoints record the whole base) and refuse a base that
        is not a valid model or differs in something muP does not cover (depth: no depth rule yet)."""
        base_fields = ("mup_base_head_dim", "mup_base_n_kv_head", "mup_base_n_layer")
        for name in base_fields:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"GPTConfig.{name}={value!r}: must be 0 (default) or a positive int")
            if value and not self.use_mup:
                raise ValueError(f"GPTConfig.{name}={value} describes a muP base: set mup_base_width too, or drop it")
        a = self.depth_alpha
        if not isinstance(a, (int, float)) or not (a == 0 or 0.5 <= a <= 1):
            raise ValueError(f"GPTConfig.depth_alpha={a!r}: must be 0 (no depth rule) or in [0.5, 1] "
                             "(1 = CompleteP, 0.5 = Depth-muP)")
        if a and not self.use_mup:
            raise ValueError(f"GPTConfig.depth_alpha={a} is a rule relative to a muP base: set mup_base_width too "
                             "(= n_embd for depth-only transfer)")
        if not self.use_mup:
            return
        b, hd = self.mup_base_width, self.mup_base_head_dim or self.head_dim
        if b % hd or hd % 2:
            raise ValueError(f"GPTConfig.mup_base_width={b} is not a multiple of the base head_dim {hd} (even): "
                             "set mup_base_head_dim to the head_dim the base was tuned at")
        n_head = b // hd
        kv = self.mup_base_n_kv_head or (n_head if self.n_kv_head == self.n_head else self.n_kv_head)
        if n_head % kv:
            raise ValueError(f"GPTConfig muP base: {n_head} heads (width {b}, head_dim {hd}) not divisible by "
                             f"{kv} kv heads: set mup_base_n_kv_head to the base's kv-head count")
        n_layer = self.mup_base_n_layer or self.n_layer
        if n_layer != self.n_layer and not self.depth_alpha:
            raise ValueError(f"GPTConfig.n_layer={self.n_layer} but the muP base has mup_base_n_layer={n_layer}: "
                             f"muP alone transfers across width only: set depth_alpha=1 (CompleteP, --depth-alpha 1) "
                             f"or tune the base at depth {self.n_layer}")
        self.mup_base_head_dim, self.mup_base_n_kv_head, self.mup_base_n_layer = hd, kv, n_layer
        self.attn_mult = self.attn_mult or math.sqrt(hd)  # muP == SP at the base width, whatever the head_dim

    def mup_base(self):
        """The width base (muP) at this model's depth, or this config (SP). Comparing its parameter shapes with this
        model's tells which dimensions grow with width (explicit base shapes, as microsoft/mup's make_base_shapes);
        depth has its own factors (`depth_mult`), so per-layer shapes stay comparable."""
        if not self.use_mup:
            return self
        b = self.mup_base_width
        return replace(self, n_embd=b, n_head=b // self.mup_base_head_dim, n_kv_head=self.mup_base_n_kv_head)

    def mup_delta(self):
        """A config whose shapes differ from the base's exactly in the dimensions that grow with width: this one,
        or at the base width (where nothing differs yet) the base with twice the heads, kv heads too if MHA."""
        base = self.mup_base()
        if self.n_embd != base.n_embd or not self.use_mup:
            return self
        kv = 2 * base.n_kv_head if self.n_kv_head == self.n_head else base.n_kv_head
        return replace(base, n_embd=2 * base.n_embd, n_head=2 * base.n_head, n_kv_head=kv)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def use_mup(self):
        return self.mup_base_width > 0

    @property
    def width_mult(self):
        """m = n_embd / base width; exactly 1 under SP and at the base width."""
        return self.n_embd / self.mup_base_width if self.use_mup else 1.0

    @property
    def depth_mult(self):
        """m_L = n_layer / base depth under the depth rule; exactly 1 without it and at the base depth."""
        return self.n_layer / self.mup_base_n_layer if self.depth_alpha else 1.0

    @property
    def branch_mult(self):
        """Residual branch multiplier m_L^-alpha (CompleteP Table 1): keeps each block's contribution ~1/L, so
        the sum over L blocks, and its change in training, stays O(1) as depth grows."""
        return self.depth_mult ** -self.depth_alpha

    @property
    def attn_scale(self):
        # muP: q.k grows like head_dim once q and k correlate during training, so scale by 1/d (TP5 sec. 4)
        return self.attn_mult / self.head_dim if self.use_mup else 1.0 / math.sqrt(self.head_dim)

    @property
    def logit_mult(self):
        return self.output_mult / self.width_mult if self.use_mup else 1.0

    def windows(self):
        """Per-layer left window (past tokens a query sees besides itself); None = full causal."""
        pattern = (self.window_pattern * self.n_layer)[: self.n_layer]
        return [self.sequence_len // 2 if c == "S" and i < self.n_layer - 1 else None for i, c in enumerate(pattern)]


WIDTH_CLASS = {(True, True): "hidden", (True, False): "input", (False, True): "output", (False, False): "fixed"}


def fans(name, shape):
    """(fan_out, fan_in) of a parameter: nn.Linear stores (out, in); the embedding maps vocab (in) to width (out);
    a vector counts as fan_out x 1."""
    if len(shape) == 1:
        return shape[0], 1
    return (shape[1], shape[0]) if name == "transformer.wte.weight" else (shape[0], shape[1])


def norm(x):
    # parameter-free RMSNorm: no gains, so no extra muP role to get wrong
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    # fp32 tables, result in x's dtype: under autocast q and k stay in the compute dtype like v (an fp32 q, k
    # next to a bf16 v is what broke the first CUDA forward)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


def attention(q, k, v, scale, window, impl, pos=0):
    """Causal attention of (B, T_q, H, D) q at positions pos.. on (B, T_k, H_kv, D) k, v at positions 0..;
    returns (B, T_q, H, D). T_q < T_k only when decoding with a KV cache. Dispatch: `auto` takes the Triton
    kernel on CUDA where it supports the case, SDPA otherwise; `triton` fails in one line where it cannot run."""
    if pos == 0 and (impl == "triton" or (impl == "auto" and q.is_cuda)):
        import kernels.attention_torch as attn  # never imports Triton

        why = attn.unsupported(q.device.type, attn.compute_dtype(q, k, v), q.size(3))
        if why is None:
            from kernels.attention import flash_attention  # lazy: Triton is only imported on this path
            return flash_attention(q, k, v, scale=scale, causal=True, window=window)
        if impl == "triton":
            raise ValueError(f"attn_impl='triton' cannot run {why}: use attn_impl='sdpa' (--attn-impl sdpa) or auto")
    # SDPA. Decoding (pos > 0, T_q = 1 per token) always takes it: a one-row query would fill one row of the
    # kernel's 64-128-row tile, and the cache read dominates anyway.
    Tq, Tk = q.size(1), k.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.size(1) != k.size(1)
    if Tq == Tk and (window is None or window >= Tk - 1):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        i = pos + torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        mask = (j <= i) & (j >= i - (Tk if window is None else window))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2)


class KVCache:
    """Keys and values of every position seen so far, per layer, for generation (nanochat's engine, minus
    batching): `pos` tokens are stored; GPT.forward appends its input's and advances `pos`."""

    def __init__(self, n_layer, max_len):
        self.max_len, self.pos = max_len, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.config, self.layer = config, layer
        hd = config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * hd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, window, kv_cache=None):
        B, T, C = x.shape
        cfg = self.config
        q = self.c_q(x).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.c_k(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        v = self.c_v(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        pos = 0
        if kv_cache is not None:
            pos = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)
        y = attention(q, k, v, cfg.attn_scale, window, cfg.attn_impl, pos)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)
        self.branch_mult = config.branch_mult  # CompleteP's (L_base/L)^alpha; 1.0 without the depth rule

    def forward(self, x, cos, sin, window, kv_cache=None):
        x = x + self.branch_mult * self.attn(norm(x), cos, sin, window, kv_cache)
        return x + self.branch_mult * self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # per-layer residual scalars (nanochat): x <- resid_lambda * x + x0_lambda * x0 before each block
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.windows = config.windows()
        cos, sin = self._rotary(config.sequence_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # -------------------------------------------------------------------------------------------------
    # parameter roles and the muP rules (the single source for init, optimizer and the role table)

    def param_roles(self):
        """Explicit role of every parameter (microsoft/mup naming); an unknown parameter is an error."""
        roles = {}
        for name, p in self.named_parameters():
            if name == "transformer.wte.weight":
                roles[name] = "embedding"
            elif name == "lm_head.weight":
                roles[name] = "readout"
            elif name.startswith("transformer.h.") and name.endswith(".weight") and p.ndim == 2:
                roles[name] = "matrix"
            elif name in ("resid_lambdas", "x0_lambdas"):
                roles[name] = "scalar"
            else:
                raise ValueError(f"parameter {name} has no muP role: add it to GPT.param_roles and muP_changes.md")
        return roles

    def param_shapes(self):
        """Per parameter: role, width class, (fan_out, fan_in), base shape and r_out, r_in = fan / base fan.

        The class says which fans grow with width, judged on explicit base shapes (GPTConfig.mup_base, as in
        microsoft/mup): hidden (both), input (fan_out only: the embedding), output (fan_in only: lm_head, and
        c_k/c_v when n_kv_head stays fixed while heads are added), fixed (neither: the residual scalars).
        SP has no base: class '-', ratios 1. A parameter the base lacks, or of another rank there, raises."""
        cfg = self.config
        roles = self.param_roles()
        if cfg.use_mup:
            with torch.device("meta"):
                base = dict(GPT(cfg.mup_base()).named_parameters())
                delta = dict(GPT(cfg.mup_delta()).named_parameters())
        out = {}
        for name, p in self.named_parameters():
            fo, fi = fans(name, p.shape)
            row = dict(role=roles[name], cls="-", fan_out=fo, fan_in=fi, base_shape=tuple(p.shape), r_out=1.0, r_in=1.0)
            if cfg.use_mup:
                if name not in base or base[name].ndim != p.ndim:
                    raise ValueError(f"parameter {name} {tuple(p.shape)} has no counterpart in the muP base model: "
                                     "add it to GPT.param_shapes and muP_changes.md")
                bo, bi = fans(name, base[name].shape)
                do, di = fans(name, delta[name].shape)
                row.update(cls=WIDTH_CLASS[do != bo, di != bi], base_shape=tuple(base[name].shape), r_out=fo / bo,
                           r_in=fi / bi)
            out[name] = row
        return out

    def init_std(self, name, s):
        """Init std of one parameter (`s`: its row of `param_shapes`).

        Matrices and the embedding: SP's std at the base shape times r_in^-1/2 * min(1, r_out/r_in)^1/2, so the
        spectral norm scales like sqrt(fan_out/fan_in) from the base (Yang, Simon & Bernstein 2023, Cond. 1;
        TP5 Table 3): hidden 1/sqrt(fan_in), input constant, output ~1/fan_in. SP's std: embedding 1, matrices
        1/sqrt(fan_in), out-projections 0 (nanochat). lm_head: SP 0.001, muP 0 (TP5 sec. D.2).
        `init_scale` multiplies every std but the scalars' (initial values, not stds): TP5's tunable init
        multiplier (sec. 4), the same in both modes, so it is swept at the base width and transfers under muP."""
        role = s["role"]
        if role == "scalar":
            return 1.0 if name == "resid_lambdas" else 0.0
        if role == "readout":
            return 0.0 if self.config.use_mup else 0.001 * self.config.init_scale
        if name.endswith("c_proj.weight"):
            return 0.0
        base_std = 1.0 if role == "embedding" else (s["fan_in"] / s["r_in"]) ** -0.5
        return self.config.init_scale * base_std * s["r_in"] ** -0.5 * min(1.0, s["r_out"] / s["r_in"]) ** 0.5

    def _resolve_mup(self, use_mup, base_width):
        cfg = self.config
        if use_mup is None:
            use_mup = cfg.use_mup
        if use_mup != cfg.use_mup:
            raise ValueError(
                f"use_mup={use_mup} contradicts GPTConfig.mup_base_width={cfg.mup_base_width}: "
                "set the config's mup_base_width instead"
            )
        if use_mup and base_width is not None and base_width != cfg.mup_base_width:
            raise ValueError(
                f"base_width={base_width} contradicts GPTConfig.mup_base_width={cfg.mup_base_width}: "
                "rebuild the model with the base width you want"
            )
        return use_mup

    def param_rules(
        self,
        matrix_lr=None,
        embedding_lr=0.2,
        unembedding_lr=0.004,
        scalar_lr=0.5,
        weight_decay=0.0,
        adam_betas=(0.8, 0.95),
        adam_eps=1e-10,
        muon_momentum=0.95,
        matrix_optimizer="muon",
        use_mup=None,
        base_width=None,
    ):
        """One row per parameter: role, class, init, forward multiplier, optimizer and its effective hyperparameters.

        `matrix_lr=None` takes the optimizer's default (Muon 0.02, AdamW 0.003). Every rule is SP's value at the
        base shape times a power of r_out, r_in (fan / base fan), so at the base width every multiplier is 1:
        - Muon: update scale max(1, fo/fi)^0.5 at the base shape times (r_out/r_in)^0.5, LR constant: the
          orthogonalised update's spectral norm then scales like sqrt(fan_out/fan_in) (Yang, Simon & Bernstein
          2023). Weight decay constant: the per-step decay lr*wd does not change with width.
        - AdamW matrices: LR eta/r_in (Adam's update entries are ~lr; a dense low-rank update then has spectral
          norm ~lr*sqrt(fo*fi), which must be ~sqrt(fo/fi)), weight decay wd*r_in (lr*wd invariant), eps eps/r_out
          (gradient entries scale like 1/fan_out for updates of spectral size; TP5 Table 8: hidden eps/m).
        - embedding: LR constant (r_in = 1), eps/r_out (its gradient shrinks like 1/m), no decay.
        - readout: TP5 Table 8 (MuReadout): forward multiplier output_mult/r_in, LR constant, eps/(r_out*r_in).
        - scalars: constant; resid_lambdas at 0.01 x scalar_lr, x0_lambdas at scalar_lr (nanochat's rule: a
          multiplicative residual scale compounds through the layers).
        - the Muon setup keeps nanochat's SP factor (n_embd/768)^-0.5 on the AdamW groups; muP uses its
          value at the base width, so base-width hyperparameters mean the same in both modes.
        Depth (`depth_alpha` > 0, m_L = L / L_base; CompleteP Table 1, Dey et al. 2025), times the width rules:
        - block matrices: forward m_L^-alpha on each branch output (c_proj rows), LR x m_L^(alpha-1) (a branch's
          change is then ~1/L, summed over L blocks O(1); the same for Muon, whose update size is ~lr), Adam eps
          x m_L^-alpha (their gradients carry the branch multiplier), weight decay x m_L^(1-alpha) (lr*wd kept).
        - resid_lambdas, x0_lambdas: LR x m_L^-1 for any alpha: the same x0 is added, and the stream rescaled,
          at every layer, so their per-layer changes add up coherently (L terms, not sqrt(L)).
        - embedding, readout: no depth factor (Table 1). Every factor is exactly 1 at the base depth.
        """
        if matrix_optimizer not in DEFAULT_MATRIX_LR:
            raise ValueError(f"matrix_optimizer={matrix_optimizer!r}: choose 'muon' or 'adamw'")
        cfg = self.config
        use_mup = self._resolve_mup(use_mup, base_width)
        matrix_lr = DEFAULT_MATRIX_LR[matrix_optimizer] if matrix_lr is None else matrix_lr
        if matrix_optimizer == "muon":
            width = cfg.mup_base_width if use_mup else cfg.n_embd
            adam_scale = (width / ADAMW_LR_REFERENCE_WIDTH) ** -0.5
        else:
            adam_scale = 1.0
        adam = dict(optimizer="adamw", betas=tuple(adam_betas))
        dm, alpha = cfg.depth_mult, cfg.depth_alpha
        rows = []
        for name, s in self.param_shapes().items():
            role, r_out, r_in = s["role"], s["r_out"], s["r_in"]
            row = dict(name=name, role=role, cls=s["cls"], shape=tuple(self.get_parameter(name).shape),
                       base_shape=s["base_shape"], init_std=self.init_std(name, s), fwd_mult=1.0, depth_lr=1.0)
            if role == "embedding":
                row.update(adam, lr=embedding_lr * adam_scale, eps=adam_eps / r_out, wd=0.0)
            elif role == "scalar":
                row.update(adam, depth_lr=1 / dm, eps=adam_eps, wd=0.0)
                row["lr"] = scalar_lr * (0.01 if name == "resid_lambdas" else 1.0) * row["depth_lr"]
            elif role == "readout":
                row.update(adam, lr=unembedding_lr * adam_scale, eps=adam_eps / (r_out * r_in), wd=weight_decay)
                row["fwd_mult"] = cfg.logit_mult
            elif matrix_optimizer == "muon":
                base_scale = max(1.0, (s["fan_out"] / r_out) / (s["fan_in"] / r_in)) ** 0.5  # nanochat's, at the base
                row.update(optimizer="muon", lr=matrix_lr * dm ** (alpha - 1), eps=None, momentum=muon_momentum,
                           wd=weight_decay * dm ** (1 - alpha), update_scale=base_scale * (r_out / r_in) ** 0.5)
            else:
                row.update(adam, lr=matrix_lr / r_in * dm ** (alpha - 1), eps=adam_eps / r_out * dm ** -alpha,
                           wd=weight_decay * r_in * dm ** (1 - alpha))
            if role == "matrix":
                row["depth_lr"] = dm ** (alpha - 1)
                if name.endswith("c_proj.weight"):  # the branch output: Block multiplies it by m_L^-alpha
                    row["fwd_mult"] = cfg.branch_mult
            rows.append(row)
        return rows

    def mup_table(self, print_table=False, **kwargs):
        """The role table (rows of `param_rules`); printed by the training script at start."""
        rows = self.param_rules(**kwargs)
        if print_table:
            cfg = self.config
            if cfg.use_mup:
                b = cfg.mup_base()
                print(f"muP, base: width {b.n_embd}, head_dim {b.head_dim}, {b.n_head} heads, {b.n_kv_head} kv heads, "
                      f"{cfg.mup_base_n_layer} layers; m={cfg.width_mult:g}")
                if cfg.depth_alpha:
                    dm, a = cfg.depth_mult, cfg.depth_alpha
                    print(f"depth rule alpha={a:g} (CompleteP Table 1): m_L={dm:g}, branch multiplier "
                          f"{cfg.branch_mult:.5g}, matrix LR x{dm ** (a - 1):.5g}, scalar LR x{1 / dm:.5g}")
                else:
                    print("no depth rule (depth_alpha=0): the base depth must equal this depth")
            else:
                print("SP")
            print(f"attention scale {cfg.attn_scale:.5g}, logit multiplier {cfg.logit_mult:.5g}")
            print(f"{'parameter':<36} {'role':<9} {'class':<6} {'shape':<10} {'base':<10} {'init std':>9} "
                  f"{'fwd mult':>8} {'optim':<5} {'lr':>9} {'lr depth':>8} {'adam eps':>8} {'wd':>6} {'upd scale':>9}")
            for r in rows:
                eps = "-" if r["eps"] is None else f"{r['eps']:.3g}"
                scale = f"{r['update_scale']:.4g}" if "update_scale" in r else "-"
                shape, base = ("x".join(map(str, r[k])) for k in ("shape", "base_shape"))
                print(f"{r['name']:<36} {r['role']:<9} {r['cls']:<6} {shape:<10} {base:<10} {r['init_std']:>9.4g} "
                      f"{r['fwd_mult']:>8.4g} {r['optimizer']:<5} {r['lr']:>9.4g} {r['depth_lr']:>8.4g} {eps:>8} "
                      f"{r['wd']:>6.3g} "
                      f"{scale:>9}")
        return rows

    def setup_optimizer(self, matrix_lr=None, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0,
                        scalar_lr=0.5, adam_betas=(0.8, 0.95), adam_eps=1e-10, muon_momentum=0.95,
                        matrix_optimizer="muon", use_mup=None, base_width=None):
        """One MuonAdamW with a param group per rule; each group keeps its `base_lr` for LR schedules."""
        rows = self.param_rules(matrix_lr, embedding_lr, unembedding_lr, scalar_lr, weight_decay, adam_betas,
                                adam_eps, muon_momentum, matrix_optimizer, use_mup, base_width)
        groups = {}
        for r in rows:
            # Muon stacks same-shape matrices to orthogonalise them in one batched call
            muon = r["optimizer"] == "muon"
            key = (r["optimizer"], r["role"], r["lr"], r["eps"], r["wd"], r.get("update_scale"),
                   r["shape"] if muon else None)
            g = groups.setdefault(key, dict(params=[], names=[], kind=r["optimizer"], role=r["role"],
                                            lr=r["lr"], base_lr=r["lr"], weight_decay=r["wd"]))
            if muon:
                g.update(momentum=r["momentum"], update_scale=r["update_scale"])
            else:
                g.update(eps=r["eps"], betas=r["betas"])
            g["params"].append(self.get_parameter(r["name"]))
            g["names"].append(r["name"])
        return MuonAdamW(list(groups.values()))

    # -------------------------------------------------------------------------------------------------
    # init and forward

    def _rotary(self, seq_len, base=10000.0, device=None):
        hd = self.config.head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Initialise in place; works after `GPT(config)` on the meta device and `to_empty(device=...)`."""
        shapes = self.param_shapes()
        for name, p in self.named_parameters():
            std = self.init_std(name, shapes[name])
            if p.ndim == 1:
                p.fill_(std)
            elif std == 0.0:
                p.zero_()
            elif shapes[name]["role"] == "matrix":
                p.uniform_(-(3**0.5) * std, 3**0.5 * std)  # uniform: same std, no outliers (nanochat)
            else:
                p.normal_(0.0, std)
        cos, sin = self._rotary(self.config.sequence_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, idx, targets=None, reduction="mean", kv_cache=None):
        """Logits (B, T, V) in fp32 without targets; else cross-entropy (targets of -1 ignored). With a
        KVCache, idx continues the cached tokens (positions kv_cache.pos..) and is appended to the cache."""
        B, T = idx.shape
        cfg = self.config
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + T > cfg.sequence_len:
            raise ValueError(f"input length {pos + T} exceeds GPTConfig.sequence_len={cfg.sequence_len}")
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, cos, sin, self.windows[i], kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = norm(x)
        hooked = self.lm_head._forward_hooks or self.lm_head._forward_pre_hooks  # coord checks must see lm_head
        if targets is not None and cfg.head_impl != "eager" and not hooked:
            return self._fused_loss(x, targets, reduction)
        logits = self.lm_head(x).float()  # hooks on lm_head see the raw, unscaled logits
        logits = logits * cfg.logit_mult
        if cfg.softcap > 0:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss

    def _fused_loss(self, x, targets, reduction):
        """lm_head + logit multiplier + softcap + cross-entropy without materialising the (tokens, vocab) logits."""
        import kernels.head_torch as head  # never imports Triton

        cfg = self.config
        fn = head.chunked_linear_cross_entropy  # both run the matmuls in autocast's dtype, as lm_head would
        if cfg.head_impl == "triton" or (cfg.head_impl == "auto" and x.is_cuda):
            why = head.unsupported(x.device.type, head.compute_dtype(x))
            if why is None:
                from kernels.head import fused_linear_cross_entropy as fn  # lazy: Triton is only imported here
            elif cfg.head_impl == "triton":
                raise ValueError(f"head_impl='triton' cannot run {why}: use head_impl='chunked' (--head-impl chunked)")
        B, T, C = x.shape
        loss = fn(x.reshape(B * T, C), self.lm_head.weight, targets.reshape(-1), logit_mult=cfg.logit_mult,
                  softcap=cfg.softcap, ignore_index=-1, reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss

    # -------------------------------------------------------------------------------------------------
    # accounting and sampling

    def num_flops_per_token(self):
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd) plus attention scores (causal, unwindowed)."""
        cfg = self.config
        n_matmul = sum(p.numel() for n, p in self.named_parameters() if n != "transformer.wte.weight" and p.ndim == 2)
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.sequence_len

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42, use_cache=True):
        """Sample continuation token ids of a list of prompt ids. With the KV cache each step feeds only the
        new token. The context is the last sequence_len tokens: once longer, every position shifts each step,
        so from then on each token takes a full forward over that window (with or without the cache)."""
        device = self.cos.device
        L = self.config.sequence_len
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        cache = KVCache(self.config.n_layer, L) if use_cache else None
        out = []
        for _ in range(max_tokens):
            if cache is not None and ids.size(1) <= L:
                logits = self(ids[:, cache.pos:], kv_cache=cache)[:, -1, :]
            else:
                logits = self(ids[:, -L:])[:, -1, :]
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
