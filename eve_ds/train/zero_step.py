"""DeepSpeed's ZeRO-1/2 optimizer step without host syncs (and, opt-in, without a loop over gradients).

DeepSpeed 0.19's `DeepSpeedZeroOptimizer` reads the device twice per parameter group in every step, though
nothing it does needs the host to know the value:

* `get_grad_norm_direct` masks an inf/nan norm to -1 with `masked_fill_(mask, torch.tensor(-1.0,
  device=...))`: a tensor made from Python data on the device, a pageable host-to-device copy that waits
  for the device on CUDA (and the CUDA `masked_fill_` reads a 0-d device value);
* `unscale_and_clip_grads` asks `bool(is_invalid_grad_norm(norm))` to replace an invalid norm by inf.

`make_step_sync_free` replaces both methods of one optimizer instance with versions that compute the same
values on the device (`masked_fill_` with a Python number, `torch.where`): the same gradients, norms and updates, bit for bit. With
`foreach_norm=True` the per-gradient-tensor loop of `g.to(fp32)` + `vector_norm` (2 ops per tensor, 623
tensors in EVE-Base) becomes one `torch._foreach_norm`; the norms are the same numbers to float precision,
not necessarily bit for bit (another reduction kernel on CUDA), hence opt-in (`train.zero_grad_norm`).
Anything the replacements do not cover (another norm type, pipeline-replicated or tensor-parallel
parameters, a norm given as a Python number) goes to DeepSpeed's own method.
"""

from __future__ import annotations

import types

import torch
from deepspeed import comm as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.zero.utils import get_norm_dtype
from torch import Tensor


def _invalid(norm: Tensor) -> Tensor:
    return ~torch.isfinite(norm) | (norm < 0)


def _grad_norm(self, gradients, params, norm_type=2, *, original, foreach: bool) -> Tensor:
    """DeepSpeed's `get_grad_norm_direct` for the L2 norm, inf/nan masked to -1 by a Python scalar."""
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    pairs = list(zip(grads, params))
    if float(norm_type) != 2.0 or self.model_parallel_rank != 0 or not pairs:
        return original(gradients, params, norm_type)
    if any(hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated for _, p in pairs):
        return original(gradients, params, norm_type)
    tensors = [g.data.detach() for g, _ in pairs]
    if foreach:
        norms = torch._foreach_norm(tensors, 2, dtype=get_norm_dtype())
    else:  # DeepSpeed's own per-tensor loop
        norms = [torch.linalg.vector_norm(t.to(get_norm_dtype()), ord=2.0) for t in tensors]
    total = torch.stack(norms).pow(2.0).sum().float()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(1.0 / 2.0)
    return total.masked_fill_(total.isnan().logical_or(total.isinf()), -1.0)  # a Python scalar: no read


def _unscale_and_clip(self, grad_groups_flat, total_norm, *, original) -> None:
    """DeepSpeed's `unscale_and_clip_grads`, the invalid norm replaced by inf on the device."""
    if not isinstance(total_norm, Tensor) or self.clip_grad <= 0.0:
        return original(grad_groups_flat, total_norm)
    clip_norm = torch.where(_invalid(total_norm), float("inf"), total_norm.float())
    clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
    combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def make_step_sync_free(optimizer, foreach_norm: bool = False) -> bool:
    """Give a DeepSpeed ZeRO-1/2 optimizer the sync-free norm and clip (in place). -> whether it had them
    to replace (other wrappers are left as they are)."""
    if not all(hasattr(optimizer, m) for m in ("get_grad_norm_direct", "unscale_and_clip_grads")):
        return False
    norm, clip = optimizer.get_grad_norm_direct, optimizer.unscale_and_clip_grads

    def grad_norm(self, gradients, params, norm_type=2):
        return _grad_norm(self, gradients, params, norm_type, original=norm, foreach=foreach_norm)

    def unscale_and_clip(self, grad_groups_flat, total_norm):
        return _unscale_and_clip(self, grad_groups_flat, total_norm, original=clip)

    optimizer.get_grad_norm_direct = types.MethodType(grad_norm, optimizer)
    optimizer.unscale_and_clip_grads = types.MethodType(unscale_and_clip, optimizer)
    return True
