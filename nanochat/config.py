"""
The two configs, torch-free so scripts can build and check them before importing torch:

- GPTConfig: the model (the only model config), with the muP / depth base it was tuned at and the forward
  multipliers that follow from it (attention scale, logit multiplier, residual branch multiplier). The
  per-parameter muP rules (init, LR, eps, weight decay, Muon update scale) are in gpt.py's rules section.
- OptimConfig: the optimizer hyperparameters, their defaults and the schedules, the one home for them.
  GPT.param_rules turns them into per-parameter values (muP: they are the values at the base shape, tuned on the
  proxy); base_train takes its option defaults and help from here, the sweep planner (transfer.py) its base values.

Both default to nanochat's recipe (karpathy/nanochat master, 92d63d4): its model features (value embeddings,
smear and backout gates, per-layer residual-scalar ramps, QK gain, SSSL windows) and its optimizer (Polar Express
+ NorMuon + cautious, cosine-scheduled weight decay on Muon; its per-group AdamW settings; its LR and momentum
schedules). Each feature is a field, so it can be switched off.
"""

import math
from dataclasses import dataclass, field, replace

MATRIX_LR = {"muon": 0.02, "adamw": 0.003}  # hidden-matrix LR by optimizer
# nanochat's AdamW groups (gpt.py: setup_optimizer): betas and decoupled weight decay per role. Not scheduled and
# not tied to `weight_decay` (that is the matrices'); the value embeddings train at half the embedding LR.
ADAMW_GROUPS = {
    "embedding": dict(betas=(0.8, 0.995), wd=0.001),
    "value_emb": dict(betas=(0.8, 0.995), wd=0.01),
    "readout": dict(betas=(0.8, 0.96), wd=0.01),
    "resid_lambdas": dict(betas=(0.8, 0.95), wd=0.05),
    "x0_lambdas": dict(betas=(0.96, 0.95), wd=0.0),
    "gate": dict(betas=(0.8, 0.95), wd=0.0),
    "matrix": dict(betas=(0.8, 0.95), wd=None),  # the all-AdamW setup's matrices: `weight_decay`
}
VALUE_EMB_LR_MULT = 0.5
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input (nanochat)
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the normalised embedding (nanochat)


@dataclass
class OptimConfig:
    """Optimizer hyperparameters at the base shape and the schedules (GPT.param_rules derives every parameter's
    values from them; base_train applies the schedules each step)."""

    matrix_optimizer: str = field(default="muon", metadata=dict(help="optimizer for hidden matrices"))
    matrix_lr: float = field(default=None, metadata=dict(
        help=f"hidden-matrix LR (default: muon {MATRIX_LR['muon']}, adamw {MATRIX_LR['adamw']})"))
    embedding_lr: float = field(default=0.3, metadata=dict(help="AdamW LR of the token embedding (value embeddings: "
                                                                "half of it; both scaled by (width / 768)^-0.5; "
                                                                "muP: base width)"))
    unembedding_lr: float = field(default=0.008, metadata=dict(help="AdamW LR of lm_head (scaled as the embedding's)"))
    scalar_lr: float = field(default=0.5, metadata=dict(help="AdamW LR of x0_lambdas (resid_lambdas: 0.01 x it)"))
    gate_lr: float = field(default=0.2, metadata=dict(help="AdamW LR of the smear gate and the smear / backout "
                                                          "lambdas (not width-scaled)"))
    weight_decay: float = field(default=0.28, metadata=dict(help="decoupled weight decay of the hidden matrices "
                                                                 "(Muon: cautious); the other groups: nanochat's fixed "
                                                                 "values"))
    adam_eps: float = 1e-10
    # Muon: NorMuon variance reduction (Li et al. 2025, arXiv 2510.05491), 0 = off; MuonEq row equilibration before
    # the orthogonalisation; Muon+ renormalisation of the polar factor's Frobenius norm to sqrt(min(rows, cols));
    # cautious weight decay (decay only where update and weight agree in sign)
    normuon_beta2: float = field(default=0.9, metadata=dict(help="NorMuon second-moment EMA (0 = off)"))
    muon_eq: bool = True
    muon_renorm: bool = False
    cautious_wd: bool = True
    # schedules (nanochat's base_train): LR warmup steps, flat, linear warmdown over the last warmdown_ratio of the
    # steps to final_lr_frac; Muon momentum momentum_start -> muon_momentum over momentum_warmup steps, then down to
    # momentum_end over the warmdown; the matrices' weight decay times a cosine from 1 to 0 ("constant": off)
    warmup_steps: int = field(default=40, metadata=dict(help="LR warmup steps (linear from 0)"))
    warmdown_ratio: float = field(default=0.65, metadata=dict(help="fraction of the steps of linear LR decay at the "
                                                                   "end"))
    final_lr_frac: float = field(default=0.05, metadata=dict(help="LR at the end as a fraction of the peak"))
    muon_momentum: float = 0.97
    momentum_start: float = 0.85
    momentum_warmup: int = 400
    momentum_end: float = 0.90
    wd_schedule: str = field(default="cosine", metadata=dict(help="the matrices' weight decay over the run: cosine "
                                                                  "from 1 to 0, or constant"))

    def __post_init__(self):
        if self.matrix_optimizer not in MATRIX_LR:
            raise ValueError(f"matrix_optimizer={self.matrix_optimizer!r}: choose 'muon' or 'adamw'")
        if self.wd_schedule not in ("cosine", "constant"):
            raise ValueError(f"wd_schedule={self.wd_schedule!r}: choose 'cosine' or 'constant'")
        for name in ("normuon_beta2", "muon_momentum", "momentum_start", "momentum_end", "final_lr_frac",
                     "warmdown_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [0, 1]")

    def hidden_lr(self):
        """matrix_lr, or when None the default of matrix_optimizer (kept None in the config, so that replacing the
        optimizer also replaces its default LR)."""
        return MATRIX_LR[self.matrix_optimizer] if self.matrix_lr is None else self.matrix_lr

    # schedules: factors at 0-based `step` of `num_steps`

    def lr_mult(self, step, num_steps):
        """nanochat's LR schedule: linear warmup over warmup_steps, flat, then a linear warmdown over the last
        warmdown_ratio of the steps to final_lr_frac (warmup wins where the two overlap, as in nanochat)."""
        warmdown = round(self.warmdown_ratio * num_steps)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step < num_steps - warmdown:
            return 1.0
        frac = (num_steps - step) / warmdown
        return frac + (1 - frac) * self.final_lr_frac

    def momentum(self, step, num_steps):
        """Muon momentum: momentum_start -> muon_momentum over the first momentum_warmup steps, then linearly down
        to momentum_end over the LR warmdown (nanochat's; the warmup wins where the two overlap)."""
        warmdown = round(self.warmdown_ratio * num_steps)
        if step < self.momentum_warmup:
            frac = step / self.momentum_warmup
            return (1 - frac) * self.momentum_start + frac * self.muon_momentum
        if warmdown and step >= num_steps - warmdown:
            frac = (step - (num_steps - warmdown)) / warmdown
            return (1 - frac) * self.muon_momentum + frac * self.momentum_end
        return self.muon_momentum

    def wd_mult(self, step, num_steps):
        """Factor on the matrices' weight decay: cosine from 1 at step 0 to 0 at the end (nanochat), or 1."""
        if self.wd_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * step / num_steps))


@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    window_pattern: str = "SSSL"  # L = full causal, S = short_window past tokens; tiled, last layer L
    short_window: int = 0  # 0 = a quarter of sequence_len rounded up to whole 128-token tiles (nanochat)
    softcap: float = 15.0  # tanh logit cap; 0 disables it
    # nanochat master's model features (each can be switched off)
    value_embeds: bool = True  # value embeddings on alternating layers (the last included), gated into v
    smear: bool = True  # the previous token's embedding mixed into each position through a gate
    backout: bool = True  # a learned fraction of the middle layer's residual subtracted before the final norm
    scalar_init: str = "ramp"  # resid/x0_lambdas: "ramp" 1.15 -> 1.05 and 0.20 -> 0.05 over the layers; "flat" 1, 0
    qk_gain: float = 1.2  # q and k multiplied by this after QK-norm (sharper attention)
    fc_init: float = 0.4  # c_fc's init std multiplier
    embed_std: float = 0.8  # token embedding init std
    rope_base: float = 100000.0  # rotary base
    pad_vocab_to: int = 64  # embedding and lm_head rows rounded up to a multiple (1 = no padding)
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
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by GPTConfig.n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_head={self.n_head} is not divisible by GPTConfig.n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig head_dim={self.head_dim} (n_embd/n_head) must be even for rotary")
        if not self.window_pattern or set(self.window_pattern) - {"L", "S"}:
            raise ValueError(f"GPTConfig.window_pattern={self.window_pattern!r}: use only 'L' and 'S' characters")
        for name in ("short_window", "pad_vocab_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "pad_vocab_to" else 0):
                raise ValueError(f"GPTConfig.{name}={value!r}: must be an integer >= "
                                 f"{1 if name == 'pad_vocab_to' else 0}")
        if self.scalar_init not in ("ramp", "flat"):
            raise ValueError(f"GPTConfig.scalar_init={self.scalar_init!r}: choose 'ramp' or 'flat'")
        for name, channels in (("value_embeds", VE_GATE_CHANNELS), ("smear", SMEAR_CHANNELS)):
            if getattr(self, name) and self.n_embd < channels:
                raise ValueError(f"GPTConfig.{name}=True reads the first {channels} channels but n_embd="
                                 f"{self.n_embd}: use a wider model or set {name}=False")
        if not isinstance(self.mup_base_width, int) or self.mup_base_width < 0:
            raise ValueError(f"GPTConfig.mup_base_width={self.mup_base_width!r}: must be 0 (SP) or a positive int")
        for name in ("softcap", "attn_mult", "output_mult", "init_scale", "qk_gain", "fc_init", "embed_std",
                     "rope_base"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name not in ("softcap", "attn_mult")):
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
        for name, channels in (("value_embeds", VE_GATE_CHANNELS), ("smear", SMEAR_CHANNELS)):
            if getattr(self, name) and b < channels:
                raise ValueError(f"GPTConfig.mup_base_width={b}: {name}=True reads the first {channels} channels, "
                                 f"so the base must be at least {channels} wide: use a wider base or {name}=False")
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

    def depth_factors(self):
        """The depth rule's factors (all 1 without it): m_L, the branch multiplier, and the LR factors of the block
        matrices (m_L^(alpha-1)) and of the residual scalars (1/m_L); GPT.param_rules applies them."""
        dm = self.depth_mult
        return dict(m_L=dm, branch_mult=self.branch_mult, matrix_lr=dm ** (self.depth_alpha - 1), scalar_lr=1 / dm)

    @property
    def attn_scale(self):
        """Scale of the attention logits q.k: qk_gain^2 (nanochat multiplies q and k by qk_gain after QK-norm) times
        1/sqrt(d) under SP, attn_mult/d under muP (q.k grows like head_dim once q and k correlate, TP5 sec. 4)."""
        base = self.attn_mult / self.head_dim if self.use_mup else 1.0 / math.sqrt(self.head_dim)
        return self.qk_gain**2 * base

    @property
    def logit_mult(self):
        return self.output_mult / self.width_mult if self.use_mup else 1.0

    @property
    def has_backout(self):
        """Backout subtracts the middle block's output (block n_layer // 2, nanochat's choice). At depth <= 2 that is
        the last block, where x - lambda x only rescales x before the final norm: the loss ignores lambda (its
        gradient is rounding noise) except at lambda = 1, where the readout's input vanishes and then flips sign.
        AdamW's lr x sign(noise) steps walk lambda there: loss spikes to 13-17 nats in about half of the depth-2
        runs at 512 tokens per step (measured). So no backout below depth 3."""
        return self.backout and self.n_layer // 2 < self.n_layer - 1

    @property
    def padded_vocab(self):
        """Rows of the embeddings and lm_head: vocab_size rounded up to pad_vocab_to (whole tensor-core tiles); the
        padding rows are never looked up and never scored (the logits are cut back to vocab_size)."""
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def windows(self):
        """Per-layer left window (past tokens a query sees besides itself); None = full causal. S layers see
        short_window tokens (default: a quarter of the context in whole 128-token tiles, as nanochat's FA3 tiles)."""
        short = self.short_window or -(-self.sequence_len // 4 // 128) * 128
        pattern = (self.window_pattern * self.n_layer)[: self.n_layer]
        return [short if c == "S" and i < self.n_layer - 1 and short < self.sequence_len - 1 else None
                for i, c in enumerate(pattern)]
