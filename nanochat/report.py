"""
What a training run records and shows: config.json and metrics.jsonl (and wandb when asked), the muP role table
(printed at start) and the loss plot (at the end).
"""

import json
import os

from nanochat.common import atomic_write_text


class RunLog:
    """A run's config.json and metrics.jsonl, and a wandb run when named (offline unless WANDB_MODE says otherwise:
    never online by accident). Rank 0 writes; every rank keeps the rows. Resuming from `start_step` keeps the rows up
    to it and drops the later ones: they will be redone."""

    def __init__(self, out_dir, meta, master, start_step=0, wandb_name=""):
        self.path, self.master, self.wandb = os.path.join(out_dir, "metrics.jsonl"), master, None
        self.rows = []
        if start_step and os.path.exists(self.path):
            self.rows = [m for m in map(json.loads, open(self.path)) if m["step"] <= start_step]
        if master:
            os.makedirs(out_dir, exist_ok=True)
            atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(meta, indent=2))
            atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in self.rows))
            if wandb_name:
                import wandb

                self.wandb = wandb.init(project="nanochat-mup", name=wandb_name, dir=out_dir, config=meta,
                                        mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row):
        self.rows.append(row)
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb is not None:
                self.wandb.log(row, step=row["step"])

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def print_role_table(model, rows):
    """The role table: the muP base and depth rule, then one line per row of `model.param_rules(...)` (role, class,
    shapes, init (N/U std, or the fixed initial value), multiplier, optimizer, LR, eps, AdamW betas, weight decay
    (its value at step 0; base_train schedules the matrices'), Muon update scale)."""
    cfg = model.config
    if cfg.use_mup:
        b = cfg.mup_base()
        print(f"muP, base: width {b.n_embd}, head_dim {b.head_dim}, {b.n_head} heads, {b.n_kv_head} kv heads, "
              f"{cfg.mup_base_n_layer} layers; m={cfg.width_mult:g}")
        if cfg.depth_alpha:
            f = cfg.depth_factors()
            print(f"depth rule alpha={cfg.depth_alpha:g} (CompleteP Table 1): m_L={f['m_L']:g}, branch multiplier "
                  f"{f['branch_mult']:.5g}, matrix LR x{f['matrix_lr']:.5g}, scalar LR x{f['scalar_lr']:.5g}")
        else:
            print("no depth rule (depth_alpha=0): the base depth must equal this depth")
    else:
        print("SP")
    print(f"attention scale {cfg.attn_scale:.5g}, logit multiplier {cfg.logit_mult:.5g}")
    print(f"{'parameter':<36} {'role':<9} {'class':<6} {'shape':<10} {'base':<10} {'init':>11} "
          f"{'fwd mult':>8} {'optim':<5} {'lr':>9} {'lr depth':>8} {'adam eps':>8} {'betas':>10} {'wd':>6} "
          f"{'upd scale':>9}")
    for r in rows:
        eps = "-" if r["eps"] is None else f"{r['eps']:.3g}"
        scale = f"{r['update_scale']:.4g}" if "update_scale" in r else "-"
        betas = "/".join(f"{b:g}" for b in r["betas"]) if "betas" in r else "-"
        shape, base = ("x".join(map(str, r[k])) for k in ("shape", "base_shape"))
        print(f"{r['name']:<36} {r['role']:<9} {r['cls']:<6} {shape:<10} {base:<10} {r['init']:>11} "
              f"{r['fwd_mult']:>8.4g} {r['optimizer']:<5} {r['lr']:>9.4g} {r['depth_lr']:>8.4g} {eps:>8} "
              f"{betas:>10} {r['wd']:>6.3g} {scale:>9}")


def plot_losses(metrics, path, title):
    """Train loss and val bits per byte against the step, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5), dpi=80)
    ax[0].plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics])
    ax[0].set(xlabel="step", ylabel="train loss (nats/token)", title=title)
    evals = [m for m in metrics if "val_bpb" in m]
    ax[1].plot([m["step"] for m in evals], [m["val_bpb"] for m in evals], marker="o")
    ax[1].set(xlabel="step", ylabel="val bits per byte")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
