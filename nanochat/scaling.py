"""
Batch size, training horizon and weight decay for a run of another size than the one its hyperparameters were
tuned at. muP (GPTConfig.mup_base_width) carries the tuned values across width and the depth rule across depth;
these rules carry them from a reference run (B_ref tokens per step, D_ref training tokens) to a run with batch B
and horizon D, the two other things a scaled-up run changes. Torch-free: base_train applies them and
scripts/transfer_report.py prints them for a target.

- horizon: D = ratio x scaling parameters (the blocks' matrices + lm_head: nanochat's count, GPT.num_scaling_params),
  or a FLOP budget / FLOPs per token (GPT.num_flops_per_token, nanochat's count), or steps x B.
- batch ("auto"): B = B_ref (D / D_ref)^0.383 rounded to a power of two (Power Lines, Bergsma et al. 2025,
  arXiv 2505.13738; as nanochat).
- LR: every LR x (B / B_ref)^e, e = 1/2 by default: the square-root rule of Adam (Malladi et al. 2022,
  arXiv 2205.10287), which nanochat also applies to Muon without having measured it there.
- weight decay: lambda x (B / B_ref) (D_ref / D) / lr_factor. Decoupled decay shrinks the matrices by eta lambda per
  step, a timescale of B / (eta lambda) tokens; the rule keeps that timescale's fraction of the run, B / (eta lambda D),
  at the reference's (Wang & Aitchison 2024, arXiv 2405.13698). With e = 1/2 it is nanochat's
  lambda sqrt(B / B_ref) (D_ref / D).
Every factor is exactly 1 at the reference.
"""

import math

POWER_LINES_EXP = 0.383
# nanochat's reference for its automatic batch: 2^19 tokens per step was the measured optimum of its depth-12 model
# trained on 12 tokens per scaling parameter (nanochat base_train, B_REF / D_REF)
NANOCHAT_REF_BATCH = 2**19
NANOCHAT_REF_RATIO = 12
NANOCHAT_REF_DEPTH = 12


def horizon(target_tokens=0, ratio=0.0, flops=0.0, scaling_params=0, flops_per_token=0):
    """Training tokens from whichever of the three budgets is given (0 = none given). ValueError for more than
    one."""
    given = [name for name, v in (("--target-tokens", target_tokens), ("--target-param-data-ratio", ratio),
                                  ("--target-flops", flops)) if v]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both set the horizon: pass one of them")
    if ratio:
        return round(ratio * scaling_params)
    if flops:
        return round(flops / flops_per_token)
    return int(target_tokens)


def auto_batch(tokens, ref_batch, ref_tokens):
    """Power Lines' batch for `tokens` from a reference run's (B_ref, D_ref), as a power of two."""
    return 2 ** round(math.log2(ref_batch * (tokens / ref_tokens) ** POWER_LINES_EXP))


def lr_factor(batch, ref_batch, exponent=0.5):
    """Factor on every LR: (B / B_ref)^exponent (0 = the rule off)."""
    return (batch / ref_batch) ** exponent


def wd_factor(batch, tokens, ref_batch, ref_tokens, lr_factor):
    """Factor on the matrices' weight decay that holds B / (eta lambda D) at the reference's, given the LR factor."""
    return (batch / ref_batch) * (ref_tokens / tokens) / lr_factor


def factors(batch, tokens, ref_batch, ref_tokens, lr_exponent=0.5, wd_rule=True):
    """{'lr': factor on every LR, 'wd': factor on the matrices' weight decay} for a run of `batch` tokens per step
    and `tokens` in all, tuned at (ref_batch, ref_tokens)."""
    lr = lr_factor(batch, ref_batch, lr_exponent)
    return dict(lr=lr, wd=wd_factor(batch, tokens, ref_batch, ref_tokens, lr) if wd_rule else 1.0)


def describe(batch, tokens, ref_batch, ref_tokens, lr_exponent, wd_rule, f):
    """One line per rule with its factor, for the log and the target command."""
    lr_why = (f"(B / B_ref)^{lr_exponent:g} = ({batch:,} / {ref_batch:,})^{lr_exponent:g}" if lr_exponent
              else "batch LR rule off")
    wd_why = (f"(B / B_ref) (D_ref / D) / lr factor = ({batch:,} / {ref_batch:,}) ({ref_tokens:,} / {tokens:,}) / "
              f"{f['lr']:.4g} (timescale B / (eta lambda D) held)" if wd_rule else "weight-decay rule off")
    return [f"every LR x {f['lr']:.4g}: {lr_why}", f"weight decay x {f['wd']:.4g}: {wd_why}"]
