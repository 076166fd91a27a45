"""
GPT model with a one-field muP switch.

Architecture (nanochat master's, karpathy/nanochat 92d63d4): token embedding with a smear gate (the previous
token's embedding mixed in), rotary positions, QK-norm with a gain, parameter-free RMSNorm, causal GQA attention
with per-layer sliding windows and gated value embeddings (ResFormer-style, alternating layers), ReLU^2 MLP,
per-layer residual scalars, a backout of the middle layer's residual, untied lm_head over a padded vocab, tanh
logit softcap, no biases. Every feature is a GPTConfig field (nanochat/config.py), so it can be switched off.

`GPTConfig.mup_base_width = b > 0` turns on muP (Tensor Programs V, Yang et al. 2022) with width
multiplier m = n_embd / b: attention logits scaled by attn_mult/head_dim, lm_head logits multiplied by
output_mult/m (its init std is SP's, so its effective init shrinks like 1/m), and the optimizer rules in
`GPT.param_rules`. GPTConfig (with the base it records and its forward multipliers) lives in nanochat/config.py,
torch-free, and is imported from here.
`mup_base_width = 0` is the standard parametrization (SP). `depth_alpha > 0` adds the depth rule (CompleteP,
Dey et al. 2025, arXiv 2505.01618; alpha = 1/2 is Depth-muP, Yang et al. 2023): residual branches multiplied by
(L_base / L)^alpha and the depth factors in `GPT.param_rules`. See muP_changes.md for every rule.
"""

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.config import (  # noqa: F401  (GPTConfig: also imported from here)
    ADAMW_GROUPS,
    SMEAR_CHANNELS,
    VALUE_EMB_LR_MULT,
    VE_GATE_CHANNELS,
    GPTConfig,
    OptimConfig,
)
from nanochat.optim import MuonAdamW

# nanochat's SP rule scales the AdamW learning rates by (n_embd / 768)^-0.5; muP freezes that factor
# at the base width so that base-width hyperparameters mean the same in both modes.
ADAMW_LR_REFERENCE_WIDTH = 768

WIDTH_CLASS = {(True, True): "hidden", (True, False): "input", (False, True): "output", (False, False): "fixed"}


def fans(name, shape):
    """(fan_out, fan_in) of a parameter: nn.Linear stores (out, in); an embedding maps vocab (in) to width (out);
    a vector counts as fan_out x 1."""
    if len(shape) == 1:
        return shape[0], 1
    embedding = name == "transformer.wte.weight" or name.startswith("value_embeds.")
    return (shape[1], shape[0]) if embedding else (shape[0], shape[1])


def has_value_embed(layer, n_layer):
    # alternating layers, the last one always included (nanochat)
    return layer % 2 == (n_layer - 1) % 2


def norm(x):
    # parameter-free RMSNorm: no gains, so no extra muP role to get wrong. Computed in fp32 and returned in x's dtype
    # on every device and torch version: CUDA autocast runs rms_norm in fp32 since torch 2.13 (CPU autocast and 2.11
    # keep bf16), which would hand the attention op fp32 q, k on a GPU but bf16 ones in the CPU emulation.
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


def apply_rotary(x, cos, sin):
    # fp32 tables, result in x's dtype: under autocast q and k stay in the compute dtype like v (an fp32 q, k
    # next to a bf16 v is what broke the first CUDA forward)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


def attention(q, k, v, scale, window, impl, pos=0):
    """Causal attention of (B, T_q, H, D) q at positions pos.. on (B, T_k, H_kv, D) k, v at positions 0..;
    returns (B, T_q, H, D). T_q < T_k only when decoding with a KV cache. Dispatch: `auto` takes the Triton
    kernel on CUDA where it supports the case in bf16/fp16, SDPA otherwise (base_train replaces `auto` by a checked
    and timed choice per case: nanochat/kernel_choice.py); `triton` fails in one line where it cannot run."""
    if pos == 0 and (impl == "triton" or (impl == "auto" and q.is_cuda)):
        import kernels.attention_torch as attn  # never imports Triton

        why = attn.unsupported(q.device.type, attn.compute_dtype(q, k, v), q.size(3), auto=impl == "auto")
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.config, self.layer = config, layer
        hd = config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * hd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = None
        if config.value_embeds and has_value_embed(layer, config.n_layer):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False)
        self.attn_impl = config.attn_impl  # nanochat/kernel_choice.py may resolve `auto` per layer

    def forward(self, x, cos, sin, window, kv_cache=None, ve=None):
        B, T, C = x.shape
        cfg = self.config
        q = self.c_q(x).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.c_k(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        v = self.c_v(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        if ve is not None:
            # value residual (ResFormer): the token's value embedding added to v through a per-kv-head gate in (0, 3)
            # in v's dtype: under autocast the lookup stays fp32 and would make v fp32 (nanochat casts it the same way)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + (gate.unsqueeze(-1) * ve.view(B, T, cfg.n_kv_head, cfg.head_dim)).to(v.dtype)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # qk_gain is in attn_scale
        pos = 0
        if kv_cache is not None:
            pos = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)
        y = attention(q, k, v, cfg.attn_scale, window, self.attn_impl, pos)
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

    def forward(self, x, cos, sin, window, kv_cache=None, ve=None):
        x = x + self.branch_mult * self.attn(norm(x), cos, sin, window, kv_cache, ve)
        return x + self.branch_mult * self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        V = config.padded_vocab
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        # per-layer residual scalars (nanochat): x <- resid_lambda * x + x0_lambda * x0 before each block
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if config.value_embeds and has_value_embed(i, config.n_layer)})
        if config.smear:  # smear: x_t += smear_lambda * sigmoid(gate(x_t[:24])) * x_{t-1}, on the embedding
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.empty(1))
        if config.has_backout:  # x -= backout_lambda * (residual after the middle block), before the final norm
            self.backout_lambda = nn.Parameter(torch.empty(1))
        self.windows = config.windows()
        self.head_impl = config.head_impl  # nanochat/kernel_choice.py may resolve `auto`
        cos, sin = self._rotary(config.sequence_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # -------------------------------------------------------------------------------------------------
    # parameter roles and the muP rules (the single source for init, optimizer and the role table)

    def param_roles(self):
        """Explicit role of every parameter (microsoft/mup naming); an unknown parameter is an error.
        embedding (wte), value_emb (value embeddings), matrix (block matrices, the value-embedding gates included:
        nanochat trains them with Muon), gate (the smear gate and the smear / backout lambdas: nanochat's AdamW group
        at a fixed LR), scalar (resid_lambdas, x0_lambdas), readout (lm_head)."""
        roles = {}
        for name, p in self.named_parameters():
            if name == "transformer.wte.weight":
                roles[name] = "embedding"
            elif name.startswith("value_embeds."):
                roles[name] = "value_emb"
            elif name == "lm_head.weight":
                roles[name] = "readout"
            elif name.startswith("transformer.h.") and name.endswith(".weight") and p.ndim == 2:
                roles[name] = "matrix"
            elif name in ("resid_lambdas", "x0_lambdas"):
                roles[name] = "scalar"
            elif name in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
                roles[name] = "gate"
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
        """Init std of one parameter (`s`: its row of `param_shapes`); None for the fixed initial values of the
        scalars and gates (`init_fixed`).

        Matrices and embeddings: SP's std at the base shape times r_in^-1/2 * min(1, r_out/r_in)^1/2, so the
        spectral norm scales like sqrt(fan_out/fan_in) from the base (Yang, Simon & Bernstein 2023, Cond. 1;
        TP5 Table 3): hidden 1/sqrt(fan_in), input constant, output ~1/fan_in. SP's stds are nanochat's: embedding
        embed_std (0.8), matrices 1/sqrt(fan_in) (c_fc x fc_init, 0.4), out-projections 0, value embeddings c_v's
        1/sqrt(n_embd) (an input-class matrix: under muP that value at the base width, constant).
        lm_head: 0.001 in both modes; under muP the forward multiplier output_mult/m makes its effective std 0.001/m
        (variance ~1/n^2, TP5 Table 3), equal to SP's at the base width. Not TP5 sec. D.2's zero init: at our scale
        that made bad all-AdamW runs much likelier (dev/experiment_log.md).
        `init_scale` multiplies every std: TP5's tunable init multiplier (sec. 4), the same in both modes, so it is
        swept at the base width and transfers under muP."""
        role, cfg = s["role"], self.config
        if role in ("scalar", "gate") or name.endswith("ve_gate.weight"):
            return None
        if role == "readout":
            return 0.001 * cfg.init_scale
        if name.endswith("c_proj.weight"):
            return 0.0
        if role == "embedding":
            base_std = cfg.embed_std
        elif role == "value_emb":
            base_std = cfg.mup_base().n_embd ** -0.5
        else:
            base_std = (s["fan_in"] / s["r_in"]) ** -0.5 * (cfg.fc_init if name.endswith("c_fc.weight") else 1.0)
        return cfg.init_scale * base_std * s["r_in"] ** -0.5 * min(1.0, s["r_out"] / s["r_in"]) ** 0.5

    def init_fixed(self, name, p):
        """Initialise a scalar or gate in place (nanochat's values, the same in both modes: their shapes do not
        grow): resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.20 -> 0.05 linearly over the layers (scalar_init 'ramp';
        'flat': 1 and 0; under the depth rule the ramps' deviations x 1/m_L), smear_lambda 0, backout_lambda 0.2, the
        gates uniform in [0, 0.02) (slightly open)."""
        L, k = self.config.n_layer, 1 / self.config.depth_mult
        ramp = torch.arange(L, dtype=torch.float32, device=p.device) / max(L - 1, 1)
        flat = self.config.scalar_init == "flat"
        # depth rule: the ramps act on every layer and compound (the stream is rescaled by prod(resid_lambdas), x0
        # added L times), so their deviation from 1 and 0 is scaled by 1/m_L, like their LR: the total over the
        # layers then stays the base depth's. Exactly nanochat's values at the base depth and without the rule.
        if name == "resid_lambdas":
            p.copy_(torch.ones_like(p) if flat else 1 + k * (0.15 - 0.10 * ramp))
        elif name == "x0_lambdas":
            p.copy_(torch.zeros_like(p) if flat else k * (0.20 - 0.15 * ramp))
        elif name in ("smear_lambda", "backout_lambda"):
            p.fill_(0.0 if name == "smear_lambda" else 0.2)
        else:
            p.uniform_(0.0, 0.02)

    def init_text(self, name, s):
        """The init of one parameter as the role table shows it."""
        std = self.init_std(name, s)
        if std is None:
            if name.endswith("gate.weight"):
                return "U[0,.02)"
            p = torch.empty(self.get_parameter(name).shape)
            self.init_fixed(name, p)
            return f"{p[0].item():.3g}" + (f"..{p[-1].item():.3g}" if len(p) > 1 and p[0] != p[-1] else "")
        return "0" if std == 0 else f"{'U' if s['role'] in ('matrix', 'value_emb') else 'N'} {std:.3g}"

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

    def param_rules(self, hp=None, use_mup=None, base_width=None, **kw):
        """One row per parameter: role, class, init, forward multiplier, optimizer and its effective hyperparameters.

        `hp`: an OptimConfig (nanochat/config.py: the values at the base shape, and their defaults); keywords
        override its fields (`param_rules(matrix_lr=0.01)`). Every rule is SP's value at the
        base shape times a power of r_out, r_in (fan / base fan), so at the base width every multiplier is 1:
        - Muon (Polar Express + NorMuon, nanochat's): update scale max(1, fo/fi)^0.5 at the base shape times
          (r_out/r_in)^0.5, LR constant: the orthogonalised update's spectral norm then scales like
          sqrt(fan_out/fan_in) (Yang, Simon & Bernstein 2023); NorMuon only redistributes the update between rows
          (or columns) at a fixed Frobenius norm, so the scale holds (muP_changes.md). Weight decay: nanochat decays
          by lr x its shape factor x wd, so wd x the base shape's factor, constant in width (lr*wd invariant);
          cautious (only where update and weight agree in sign) and cosine-scheduled by base_train.
        - the value-embedding gates (12 channels -> kv heads, Muon like every block matrix in nanochat): input class
          when kv heads grow (fixed when not). A fixed fan_in below fan_out's growth: while fan_out < fan_in the
          polar factor has orthonormal rows, so each gate already moves O(1) per unit of scale and the scale must
          stay 1; from fan_out = fan_in on it grows like sqrt(fan_out/fan_in). nanochat's max(1, fo/fi)^0.5 at the
          model's own shape is both (the spectral condition's sqrt(r_out) overshoots the wide regime: measured
          gate-logit slope +0.5 in the coordinate check).
        - AdamW matrices: LR eta/r_in (Adam's update entries are ~lr; a dense low-rank update then has spectral
          norm ~lr*sqrt(fo*fi), which must be ~sqrt(fo/fi)), weight decay wd*r_in (lr*wd invariant), eps eps/r_out
          (gradient entries scale like 1/fan_out for updates of spectral size; TP5 Table 8: hidden eps/m).
        - embedding, value embeddings (input class: only fan_out grows): LR constant (r_in = 1), eps/r_out (their
          gradients shrink like 1/m), nanochat's fixed decay; the value embeddings at half the embedding LR.
        - readout: TP5 Table 8 (MuReadout): forward multiplier output_mult/r_in, LR constant, eps/(r_out*r_in).
        - scalars: constant; resid_lambdas at 0.01 x scalar_lr, x0_lambdas at scalar_lr (nanochat's rule: a
          multiplicative residual scale compounds through the layers). Gates (smear gate, smear and backout
          lambdas: fixed class, 24 -> 1 or 1 entry): gate_lr, constant.
        - AdamW betas and the fixed decays of the AdamW groups: nanochat's per group (config.ADAMW_GROUPS).
        - embedding, value embeddings and readout keep nanochat's SP factor (n_embd/768)^-0.5 in both setups
          (without it the all-AdamW readout sat 2^1.1 below its optimum at width 64); muP uses its value at
          the base width, so base-width hyperparameters mean the same in both modes.
        Depth (`depth_alpha` > 0, m_L = L / L_base; CompleteP Table 1, Dey et al. 2025), times the width rules:
        - block matrices: forward m_L^-alpha on each branch output (c_proj rows), LR x m_L^(alpha-1) (a branch's
          change is then ~1/L, summed over L blocks O(1); the same for Muon, whose update size is ~lr), Adam eps
          x m_L^-alpha (their gradients carry the branch multiplier), weight decay x m_L^(1-alpha) (lr*wd kept).
        - resid_lambdas, x0_lambdas: LR x m_L^-1 for any alpha: the same x0 is added, and the stream rescaled,
          at every layer, so their per-layer changes add up coherently (L terms, not sqrt(L)).
        - embedding, readout: no depth factor (Table 1). Every factor is exactly 1 at the base depth.
        """
        h = replace(hp, **kw) if hp else OptimConfig(**kw)
        cfg = self.config
        use_mup = self._resolve_mup(use_mup, base_width)
        width = cfg.mup_base_width if use_mup else cfg.n_embd
        adam_scale = (width / ADAMW_LR_REFERENCE_WIDTH) ** -0.5
        dm, alpha, depth = cfg.depth_mult, cfg.depth_alpha, cfg.depth_factors()
        rows = []
        for name, s in self.param_shapes().items():
            role, r_out, r_in = s["role"], s["r_out"], s["r_in"]
            row = dict(name=name, role=role, cls=s["cls"], shape=tuple(self.get_parameter(name).shape),
                       base_shape=s["base_shape"], init_std=self.init_std(name, s), init=self.init_text(name, s),
                       fwd_mult=1.0, depth_lr=1.0)
            group = ADAMW_GROUPS[name if role == "scalar" else role]
            adam = dict(optimizer="adamw", betas=group["betas"])
            if role == "embedding":
                row.update(adam, lr=h.embedding_lr * adam_scale, eps=h.adam_eps / r_out, wd=group["wd"])
            elif role == "value_emb":
                row.update(adam, lr=VALUE_EMB_LR_MULT * h.embedding_lr * adam_scale, eps=h.adam_eps / r_out,
                           wd=group["wd"])
            elif role == "scalar":
                row.update(adam, depth_lr=depth["scalar_lr"], eps=h.adam_eps, wd=group["wd"])
                row["lr"] = h.scalar_lr * (0.01 if name == "resid_lambdas" else 1.0) * row["depth_lr"]
            elif role == "gate":
                row.update(adam, lr=h.gate_lr, eps=h.adam_eps, wd=group["wd"])
            elif role == "readout":
                row.update(adam, lr=h.unembedding_lr * adam_scale, eps=h.adam_eps / (r_out * r_in), wd=group["wd"])
                row["fwd_mult"] = cfg.logit_mult
            elif h.matrix_optimizer == "muon":
                base_scale = max(1.0, (s["fan_out"] / r_out) / (s["fan_in"] / r_in)) ** 0.5  # nanochat's, at the base
                scale = base_scale * (r_out / r_in) ** 0.5
                if s["cls"] == "input":  # fixed fan_in (the value-embedding gates): nanochat's rule at this shape
                    scale = max(1.0, s["fan_out"] / s["fan_in"]) ** 0.5
                row.update(optimizer="muon", lr=h.hidden_lr() * depth["matrix_lr"], eps=None, momentum=h.muon_momentum,
                           wd=h.weight_decay * base_scale * dm ** (1 - alpha), update_scale=scale,
                           beta2=h.normuon_beta2, eq=h.muon_eq, renorm=h.muon_renorm, cautious=h.cautious_wd)
            else:
                row.update(adam, lr=h.hidden_lr() / r_in * depth["matrix_lr"], eps=h.adam_eps / r_out * dm ** -alpha,
                           wd=h.weight_decay * r_in * dm ** (1 - alpha))
            if role == "matrix":
                row["depth_lr"] = depth["matrix_lr"]
                if name.endswith("c_proj.weight"):  # the branch output: Block multiplies it by m_L^-alpha
                    row["fwd_mult"] = cfg.branch_mult
            rows.append(row)
        return rows

    def setup_optimizer(self, hp=None, use_mup=None, base_width=None, **kw):
        """One MuonAdamW with a param group per rule; each group keeps its `base_lr` and `base_wd` for the schedules
        (OptimConfig.lr_mult, wd_mult). Arguments as `param_rules`."""
        rows = self.param_rules(hp, use_mup, base_width, **kw)
        groups = {}
        for r in rows:
            # Muon stacks same-shape matrices to orthogonalise them in one batched call
            muon = r["optimizer"] == "muon"
            key = (r["optimizer"], r["role"], r["lr"], r["eps"], r["wd"], r.get("update_scale"), r.get("betas"),
                   r["shape"] if muon else None)
            g = groups.setdefault(key, dict(params=[], names=[], kind=r["optimizer"], role=r["role"], lr=r["lr"],
                                            base_lr=r["lr"], weight_decay=r["wd"], base_wd=r["wd"]))
            if muon:
                g.update({k: r[k] for k in ("momentum", "update_scale", "beta2", "eq", "renorm", "cautious")})
            else:
                g.update(eps=r["eps"], betas=r["betas"])
            g["params"].append(self.get_parameter(r["name"]))
            g["names"].append(r["name"])
        return MuonAdamW(list(groups.values()))

    # -------------------------------------------------------------------------------------------------
    # init and forward

    def _rotary(self, seq_len, device=None):
        hd = self.config.head_dim
        inv_freq = 1.0 / self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Initialise in place; works after `GPT(config)` on the meta device and `to_empty(device=...)`."""
        shapes = self.param_shapes()
        for name, p in self.named_parameters():
            std = self.init_std(name, shapes[name])
            if std is None:
                self.init_fixed(name, p)
            elif std == 0.0:
                p.zero_()
            elif shapes[name]["role"] in ("matrix", "value_emb"):
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
        if cfg.smear:
            x = self._smear(x, kv_cache)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, self.windows[i], kv_cache, ve)
            if i == cfg.n_layer // 2:
                x_mid = x
        if kv_cache is not None:
            kv_cache.pos += T
        if cfg.has_backout:  # remove the middle layer's low-level features before the readout (nanochat)
            x = x - self.backout_lambda * x_mid
        x = norm(x)
        hooked = self.lm_head._forward_hooks or self.lm_head._forward_pre_hooks  # coord checks must see lm_head
        if targets is not None and self.head_impl != "eager" and not hooked:
            return self._fused_loss(x, targets, reduction)
        logits = self.lm_head(x)[..., :cfg.vocab_size].float()  # hooks on lm_head see the raw, unscaled logits
        logits = logits * cfg.logit_mult
        if cfg.softcap > 0:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss

    def _smear(self, x, kv_cache):
        """nanochat's smear: each position gets smear_lambda * sigmoid(smear_gate(its first 24 channels)) times the
        previous position's normalised embedding (cheap bigram information). The first position of a sequence
        has none; when decoding, the KV cache carries the previous call's last embedding."""
        prev, start = x[:, :-1], 1
        if kv_cache is not None:
            last, kv_cache.last_embedding = kv_cache.last_embedding, x[:, -1:]
            if last is not None:
                prev, start = torch.cat([last, prev], dim=1), 0
        if x.size(1) == start:
            return x
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, start:, :SMEAR_CHANNELS]))
        return torch.cat([x[:, :start], x[:, start:] + gate * prev], dim=1)

    def _fused_loss(self, x, targets, reduction):
        """lm_head + logit multiplier + softcap + cross-entropy without materialising the (tokens, vocab) logits."""
        import kernels.head_torch as head  # never imports Triton

        cfg = self.config
        fn = head.chunked_linear_cross_entropy  # both run the matmuls in autocast's dtype, as lm_head would
        impl = self.head_impl
        if impl == "triton" or (impl == "auto" and x.is_cuda):
            why = head.unsupported(x.device.type, head.compute_dtype(x), auto=impl == "auto")
            if why is None:
                from kernels.head import fused_linear_cross_entropy as fn  # lazy: Triton is only imported here
            elif impl == "triton":
                raise ValueError(f"head_impl='triton' cannot run {why}: use head_impl='chunked' (--head-impl chunked)")
        B, T, C = x.shape
        W = self.lm_head.weight[:cfg.vocab_size]  # the padding rows are never scored (a contiguous view)
        loss = fn(x.reshape(B * T, C), W, targets.reshape(-1), logit_mult=cfg.logit_mult,
                  softcap=cfg.softcap, ignore_index=-1, reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss

    # -------------------------------------------------------------------------------------------------
    # accounting

    def num_scaling_params(self):
        """Parameters a data:param ratio counts, as nanochat does: the blocks' matrices + lm_head (its padded rows
        included); the embeddings, value embeddings and scalars are left out."""
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(("transformer.h.", "lm_head.")))

    def num_flops_per_token(self):
        """Training FLOPs per token as nanochat counts them: 6 per matmul weight (fwd + bwd; the embeddings are
        lookups) plus 12 * n_embd * keys seen per layer for the attention scores (the window on S layers)."""
        cfg = self.config
        roles = self.param_roles()
        n_matmul = sum(p.numel() for n, p in self.named_parameters()
                       if p.ndim == 2 and roles[n] not in ("embedding", "value_emb"))
        T = cfg.sequence_len
        return 6 * n_matmul + sum(12 * cfg.n_embd * min(T, T if w is None else w) for w in self.windows)


def build_model(config, device="cpu"):
    """The one way to make a GPT (training, sampling, benchmarks, checks, tests): construct on the meta device (no
    memory, no wasted init), materialise on `device`, initialise by the rules. device="meta": shapes only."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
