"""
MuonAdamW: one optimizer with Muon groups (hidden matrices) and AdamW groups (everything else).

Hand-written rather than torch.optim.Muon + torch.optim.AdamW because the training loop, the
checkpoints and the LR schedule want one object whose groups carry their muP roles, and Muon here
stacks same-shape matrices to orthogonalise them in one batched call. The AdamW arithmetic itself is
PyTorch's (`torch.optim.adamw.adamw`), so it matches torch.optim.AdamW exactly.

Muon as nanochat master runs it (Jordan et al. 2024, and nanochat's additions), per stack of same-shape matrices:
Nesterov momentum; MuonEq row equilibration (each row rescaled to the mean row norm, arXiv 2603.28254); the
orthogonal polar factor via Polar Express (Amsel et al. 2025, arXiv 2505.16932); Muon+ renormalisation of its
Frobenius norm to sqrt(min(rows, cols)), an exactly orthogonal matrix's (arXiv 2602.21545); NorMuon variance
reduction (Li et al. 2025, arXiv 2510.05491: an EMA of each row's, or for wide matrices each column's, mean
square, the update divided by its root and rescaled to its previous Frobenius norm); then the step, scaled by the
group's `update_scale` (GPT.param_rules: nanochat's max(1, fan_out/fan_in)^0.5 at the base shape, times
sqrt(r_out/r_in) under muP) so its spectral norm follows the spectral condition ||dW||_2 ~ sqrt(fan_out/fan_in)
(Yang, Simon & Bernstein 2023) and the LR is width-independent, and cautious weight decay (applied only where the
update and the weight agree in sign). Each addition is a group flag (eq, renorm, beta2 = 0 for no NorMuon,
cautious), from OptimConfig.
"""

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

# torch 2.13 renamed the tensor collectives (the old names warn there); torch 2.11 has only the old names
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

# Polar Express: per-iteration coefficients (a, b, c) of X <- a X + b (X X^T) X + c (X X^T)^2 X,
# from the paper's optimised schedule for 5 iterations
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G):
    """Approximate orthogonal polar factor of each matrix in a (..., rows, cols) stack."""
    X = G.bfloat16() if G.is_cuda else G.float()  # bf16 is accurate enough on GPU; fp32 on CPU is faster
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    # the Frobenius norm bounds the spectral norm; the 1.01 margin (nanochat's) absorbs bf16 rounding
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def muon_update(grads, state, group):
    """The Muon update of a (n, rows, cols) stack of gradients, before the LR and update scale; overwrites `grads`
    and updates the group's `state` (momentum_buffer, and second_momentum_buffer for NorMuon)."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grads)
    buf = state["momentum_buffer"]
    buf.lerp_(grads, 1 - group["momentum"])
    g = grads.lerp_(buf, group["momentum"])  # Nesterov: g + mu * (buf - g)
    if group["eq"]:  # rows rescaled to the mean row norm: a better-conditioned input to the iteration
        target = g.norm(dim=(-2, -1), keepdim=True) / g.size(-2) ** 0.5
        g = g * (target / g.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    u = orthogonalize(g)
    if group["renorm"]:  # the iteration under-converges: snap the Frobenius norm to an orthogonal matrix's
        u = u * (min(u.shape[-2:]) ** 0.5 / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    if group["beta2"]:
        u = normuon(u, state, group["beta2"])
    return u


def normuon(u, state, beta2):
    """NorMuon: divide each row (tall or square matrices) or column (wide ones) by the root of an EMA of its mean
    square, then restore the stack's Frobenius norm per matrix, so only the distribution over rows changes."""
    dim = -1 if u.size(-2) >= u.size(-1) else -2  # reduce over columns: one value per row, and vice versa
    v = u.float().square().mean(dim=dim, keepdim=True)
    if "second_momentum_buffer" not in state:
        state["second_momentum_buffer"] = torch.zeros_like(v)
    buf = state["second_momentum_buffer"]
    buf.lerp_(v, 1 - beta2)
    step = buf.clamp_min(1e-10).rsqrt()
    n = u.size(dim)
    before = (v.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    after = (v * n * step.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return u * (step * before / after.clamp_min(1e-10)).to(u.dtype)


def muon_apply(p, u, lr, group):
    """p -= lr * update_scale * u, and the decoupled decay lr * wd * p, cautious: only where u and p agree in sign
    (the decay then never fights the update). p and u: same-shape stacks or single matrices."""
    decay = lr * group["weight_decay"] * p
    if group["cautious"]:
        decay = decay * ((u * p) >= 0)
    p.sub_(lr * group["update_scale"] * u + decay)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `kind` ('muon' or 'adamw'), `lr`, `base_lr`, `weight_decay` and, for muon,
    `momentum` and `update_scale`; for adamw, `betas` and `eps`. Muon groups hold same-shape matrices."""

    def __init__(self, param_groups):
        for g in param_groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise ValueError(f"param group kind={g.get('kind')!r}: must be 'muon' or 'adamw'")
            if g["kind"] == "muon" and len({p.shape for p in g["params"]}) != 1:
                raise ValueError("a Muon param group must hold matrices of one shape")
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)

    def _adamw_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                     exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_step(self, group):
        params = group["params"]
        if any(p.grad is None for p in params):
            return
        grads = torch.stack([p.grad for p in params])
        state = self.state[params[0]]  # one stacked state per group, kept with its first param
        update = muon_update(grads, state, group)
        for p, u in zip(params, update):
            muon_apply(p, u, group["lr"], group)


    # -------------------------------------------------------------------------
    # elastic state: load what any world size saved, sharded or not

    def load_resharded(self, state_dicts, sharded):
        """Load optimizer state saved by a run of any world size: `state_dicts` is [optim.pt] when that run was
        replicated (MuonAdamW) or its per-rank [optim_rank0.pt, ...] in rank order when sharded (DistMuonAdamW).
        Each group's state is first made whole (shards concatenated, padding dropped), then cut the way this
        optimizer keeps it. Pure copies, so resuming on the same setup stays bit-identical."""
        saved_groups = state_dicts[0]["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the optimizer state has {len(saved_groups)} param groups, "
                             f"this model {len(self.param_groups)}")
        state = {}
        for group, saved in zip(self.param_groups, saved_groups):
            keys = saved["params"]
            if len(keys) != len(group["params"]):
                raise ValueError(f"param group {group.get('role', '?')}: {len(keys)} params saved, "
                                 f"{len(group['params'])} in this model")
            if sharded:
                whole = _whole_sharded(group, keys, state_dicts)
            else:
                whole = _whole_replicated(group, keys, state_dicts[0])
            state.update(self._local_state(group, keys, whole))
        self.load_state_dict(dict(state=state, param_groups=saved_groups))

    def _local_state(self, group, keys, full):
        # replicated layout: Muon's stacked buffer with the group's first param, AdamW's moments per param
        if not full:
            return {}
        if group["kind"] == "muon":
            return {keys[0]: full}
        sizes = [p.numel() for p in group["params"]]
        avgs, sqs = full["exp_avg"].split(sizes), full["exp_avg_sq"].split(sizes)
        return {k: dict(step=full["step"].clone(), exp_avg=a.view_as(p).clone(), exp_avg_sq=q.view_as(p).clone())
                for k, p, a, q in zip(keys, group["params"], avgs, sqs)}


def _check_full(group, full):
    # a whole group's state must fit the model: (n, rows, cols) momentum and NorMuon's (n, rows, 1) or (n, 1, cols)
    # second moment, or numel-long AdamW moments
    params = group["params"]
    n, shape = len(params), tuple(params[0].shape)
    rows, cols = shape if len(shape) == 2 else (0, 0)
    muon = dict(momentum_buffer=(n, *shape), second_momentum_buffer=(n, rows, 1) if rows >= cols else (n, 1, cols))
    for name, t in full.items():
        want = muon.get(name) if group["kind"] == "muon" else (sum(p.numel() for p in params),)
        if name != "step" and tuple(t.shape) != want:
            raise ValueError(f"optimizer state {name} of group {group.get('role', '?')} has shape {tuple(t.shape)}, "
                             f"this model needs {want}")
    return full


def _whole_replicated(group, keys, sd):
    """A MuonAdamW group's state as whole tensors: {} (no step taken yet), Muon {momentum_buffer (n, r, c)},
    AdamW {step, exp_avg (numel,), exp_avg_sq (numel,)} with the params flattened in group order."""
    if group["kind"] == "muon":
        st = sd["state"].get(keys[0])
        return _check_full(group, dict(st)) if st else {}
    sts = [sd["state"].get(k) for k in keys]
    if not any(sts):
        return {}
    if not all(sts) or len({float(st["step"]) for st in sts}) != 1:
        raise ValueError(f"AdamW group {group.get('role', '?')}: its params took different numbers of steps, "
                         "so the state cannot be sharded")
    return _check_full(group, dict(step=sts[0]["step"], **{n: torch.cat([st[n].reshape(-1) for st in sts])
                                                           for n in ("exp_avg", "exp_avg_sq")}))


def _whole_sharded(group, keys, sds):
    """The same whole state from a DistMuonAdamW's per-rank shards: concatenated in rank order, padding dropped."""
    parts = [sd["state"].get(keys[0]) for sd in sds]
    if not any(parts):
        return {}
    if not all(parts):
        raise ValueError(f"group {group.get('role', '?')}: some ranks' optimizer shards have no state")
    n = len(group["params"]) if group["kind"] == "muon" else sum(p.numel() for p in group["params"])
    full = {name: torch.cat([st[name] for st in parts])[:n] for name in parts[0] if name != "step"}
    if "step" in parts[0]:
        full["step"] = parts[0]["step"]
    return _check_full(group, full)


class DistMuonAdamW(MuonAdamW):
    """MuonAdamW sharded ZeRO-2 style over torch.distributed (world size > 1; gloo or nccl). Each rank passes
    its local gradients; they are reduce-scattered (averaged, as DDP would), each rank updates only its shard
    and keeps optimizer state only for it, and the updated shards are all-gathered into every rank's params.

    Shards: a Muon group's n same-shape matrices are stacked to (n, rows, cols) and zero-padded to a multiple
    of the world size, so rank r owns k = n_pad / world whole matrices [r*k, (r+1)*k) and orthogonalises only
    those. An AdamW group's params are flattened into one vector, zero-padded the same way, and rank r owns
    one contiguous slice (AdamW is elementwise, so where the cut falls does not matter). Padding is inert:
    zero gradient, zero momentum, orthogonalize(0) = 0, and it is never copied back.

    Overlap: every group's reduce-scatter is launched before any compute, so the communication of later
    groups runs during the updates of earlier ones; each group's all-gather is launched as soon as its update
    is done and all are waited for at the end. (Work.wait(), not futures: gloo has no Work.get_future.)"""

    def __init__(self, param_groups, rank, world_size):
        super().__init__(param_groups)
        self.rank, self.world_size = rank, world_size

    def _pad(self, x):
        # zero-pad dim 0 to a multiple of the world size
        pad = -x.size(0) % self.world_size
        return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x

    def _stack(self, group, tensors):
        # (n_pad, rows, cols) for muon, (numel_pad,) for adamw
        x = torch.stack(tensors) if group["kind"] == "muon" else torch.cat([t.reshape(-1) for t in tensors])
        return self._pad(x)

    def _local_state(self, group, keys, full):
        # this rank's shard of the whole state, padded and cut exactly as step() cuts the gradients
        shard = {}
        for name, t in full.items():
            if name == "step":
                shard[name] = t.clone()
            else:
                t = self._pad(t)
                k = t.size(0) // self.world_size
                shard[name] = t[self.rank * k:(self.rank + 1) * k].clone()
        return {keys[0]: shard} if shard else {}

    def _unstack(self, group, x):
        params = group["params"]
        if group["kind"] == "muon":
            return list(x[:len(params)].unbind(0))
        sizes = [p.numel() for p in params]
        return [t.view_as(p) for t, p in zip(x[:sum(sizes)].split(sizes), params)]

    @torch.no_grad()
    def step(self):
        # a group runs only when all its params have gradients; every rank runs the same model, so all agree
        groups = [g for g in self.param_groups if all(p.grad is not None for p in g["params"])]
        reduced = []
        for group in groups:
            grads = self._stack(group, [p.grad for p in group["params"]])
            shard = grads.new_empty(grads.size(0) // self.world_size, *grads.shape[1:])
            reduced.append((shard, reduce_scatter(shard, grads, op=dist.ReduceOp.AVG, async_op=True)))
        gathered = []
        for group, (grad, work) in zip(groups, reduced):
            work.wait()
            k = grad.size(0)
            # stacking all params to slice ours costs one transient copy, the size of the gradient stack above
            mine = self._stack(group, group["params"])[self.rank * k:(self.rank + 1) * k]
            state = self.state[group["params"][0]]  # the group's shard state, kept with its first param
            if group["kind"] == "muon":
                self._muon_shard(group, state, mine, grad)
            else:
                self._adamw_shard(group, state, mine, grad)
            full = mine.new_empty(k * self.world_size, *mine.shape[1:])
            gathered.append((group, full, all_gather(full, mine, async_op=True)))
        for group, full, work in gathered:
            work.wait()
            torch._foreach_copy_(group["params"], self._unstack(group, full))

    def _muon_shard(self, group, state, p, grad):
        muon_apply(p, muon_update(grad, state, group), group["lr"], group)

    def _adamw_shard(self, group, state, p, grad):
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=torch.float32),
                         exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
        beta1, beta2 = group["betas"]
        adamw([p], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]], amsgrad=False,
              beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False)


def average_gradients(params):
    """The replicated (unsharded) multi-process step's gradient sync: every gradient averaged over the ranks, as
    DDP does, one async all-reduce per parameter."""
    works = [dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True) for p in params]
    for w in works:
        w.wait()


def replica_checksum(params, world_size):
    """A float64 checksum of all parameters, the same on every rank, or RuntimeError naming each rank's."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(sums, checksum)
    if len({s.item() for s in sums}) != 1:
        raise RuntimeError(f"ranks diverged: parameter checksums {[s.item() for s in sums]}")
    return checksum.item()
