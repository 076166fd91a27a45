"""
What a training run shows besides its metrics: the muP role table (printed at start) and the loss plot (at the end).
"""


def print_role_table(model, rows):
    """The role table: the muP base and depth rule, then one line per row of `model.param_rules(...)` (role, class,
    shapes, init, multiplier, optimizer, LR, eps, weight decay, Muon update scale)."""
    cfg = model.config
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
              f"{r['wd']:>6.3g} {scale:>9}")


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
