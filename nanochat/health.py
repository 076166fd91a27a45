"""
The training loop's non-finite guard without a host sync per step.

Each step hands over its health as device tensors: the loss and the sum of gradient norms before the update and the
largest |weight| after it, already agreed over the ranks. They are copied to host memory without waiting and read one
step later, while the GPU runs that next step, so the loop never stalls the GPU to look at a number. A step whose
results are about to be used (evaluated, sampled, saved, or the last step) is read at once instead. A step's metrics
row is handed back only once its values passed, so nothing of a non-finite step is logged or saved: the guard fires
at most one step later than a per-step sync would, and always before any file records the step.
"""

import math

import torch
import torch.distributed as dist


def weights_max(params):
    """Largest |w| over all parameters as a 1-element device tensor, the max over the ranks when distributed (every
    rank holds the same weights; agreeing explicitly keeps them in lockstep regardless). Max |w| per tensor in one
    fused op: a norm could overflow on finite weights."""
    worst = torch.stack(torch._foreach_norm(list(params), ord=math.inf)).max().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst


class LateChecks:
    """Per step: push(row, loss, grad_norms, weights_max, now) queues the step's values and returns the rows whose
    steps passed, oldest first, with train_loss filled in, and the first failure as (step, message) or None."""

    def __init__(self):
        self.pending = []  # (row, host tensor of the values, CUDA event marking the copy, or None)

    def push(self, row, loss, grad_norms, weights_max, now):
        values = torch.cat([loss.reshape(1), grad_norms.reshape(1), weights_max.reshape(1)]).detach().float()
        event = None
        if values.is_cuda:  # pinned host memory, so the copy runs behind the queued work
            host = torch.empty(3, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.pending.append((row, values, event))
        return self.settle(keep_last=not now)

    def settle(self, keep_last=False):
        """Read the pending steps (all, or all but the newest); ([passed rows], failure or None)."""
        ready, self.pending = (self.pending[:-1], self.pending[-1:]) if keep_last else (self.pending, [])
        rows = []
        for row, values, event in ready:
            if event is not None:
                event.synchronize()
            loss, grads, weights = values.tolist()
            if not math.isfinite(loss + grads):
                return rows, (row["step"], f"non-finite loss {loss} or gradient norms {grads}")
            if not math.isfinite(weights):  # a finite gradient can still overflow the update (a huge LR)
                return rows, (row["step"], "non-finite parameters after the update")
            rows.append(dict(row, train_loss=loss))
        return rows, None
