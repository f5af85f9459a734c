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
`scaled_global_norm` is replaced too: DeepSpeed computes each group's norm in turn (a stack, a sum, an
all-reduce and a mask per group) and then combines them; here the groups' sums of squares form one (G,)
vector, with one all-reduce and one mask (the same numbers: each sum adds the same per-tensor norms in the
same order). DeepSpeed also recomputes the clip factor, which depends on the global norm only, for every
group; it is computed once per step. Together with the optimizer's `found_inf` (once per step,
`eve_ds.train.engine.SkipNonFiniteAdamW`) this leaves about 10 ops per group in the step.
Anything the replacements do not cover (another norm type, pipeline-replicated or tensor-parallel
parameters, a norm given as a Python number) goes to DeepSpeed's own method.
"""

from __future__ import annotations

import itertools
import types

import torch
from deepspeed import comm as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.zero.utils import get_norm_dtype
from torch import Tensor


def _invalid(norm: Tensor) -> Tensor:
    return ~torch.isfinite(norm) | (norm < 0)


def _usable(self, gradients, params) -> list[Tensor] | None:
    """The gradients whose L2 norm `_grad_norm` computes, or None when DeepSpeed's method must run (no
    gradient, pipeline-replicated parameters, a tensor-parallel rank other than 0)."""
    pairs = [(g, p) for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)]
    if self.model_parallel_rank != 0 or not pairs:
        return None
    if any(hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated for _, p in pairs):
        return None
    return [g.data.detach() for g, _ in pairs]


def _tensor_norms(tensors: list[Tensor], foreach: bool) -> list[Tensor]:
    if foreach:
        return list(torch._foreach_norm(tensors, 2, dtype=get_norm_dtype()))
    return [torch.linalg.vector_norm(t.to(get_norm_dtype()), ord=2.0) for t in tensors]  # DeepSpeed's loop


def _grad_norm(self, gradients, params, norm_type=2, *, original, foreach: bool) -> Tensor:
    """DeepSpeed's `get_grad_norm_direct` for the L2 norm, inf/nan masked to -1 by a Python scalar."""
    tensors = _usable(self, gradients, params) if float(norm_type) == 2.0 else None
    if tensors is None:
        return original(gradients, params, norm_type)
    total = torch.stack(_tensor_norms(tensors, foreach)).pow(2.0).sum().float()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(1.0 / 2.0)
    return total.masked_fill_(total.isnan().logical_or(total.isinf()), -1.0)  # a Python scalar: no read


def _expert_span(self) -> tuple[int, int] | None:
    """(first, end) of the expert groups when they are consecutive and share one reduction group, else
    None. DeepSpeed's MoE split appends them after the dense groups."""
    flags = getattr(self, "is_moe_param_group", None)  # set by DeepSpeed only for a model with MoE layers
    moe = [i for i, m in enumerate(flags or ()) if m]
    if not moe:
        return (len(self.bit16_groups),) * 2
    pgs = {id(self.real_dp_process_group[i]) for i in moe}
    return (moe[0], moe[-1] + 1) if moe == list(range(moe[0], moe[-1] + 1)) and len(pgs) == 1 else None


def _global_norm(self, norm_type=2, *, original, foreach: bool) -> Tensor:
    """DeepSpeed's `scaled_global_norm` (per-group norms, the expert groups' averaged over their
    reduction group, combined with `combine_grad_norm_groups`), every group at once: one norm call, one
    all-reduce and one (G,) vector instead of G of each. The same values: each group's sum of squares
    is the sum of the same per-tensor norms, in the same order."""
    span = _expert_span(self)
    groups = range(len(self.bit16_groups))
    lists = [_usable(self, self.averaged_gradients[i], self.params_in_partition[i]) for i in groups]
    plain = not self.cpu_offload and span is not None
    if norm_type != 2 or not plain or any(t is None for t in lists):
        return original(norm_type)
    if any(self._muon_update_lacks_loss_scale(i) for i in groups):
        return original(norm_type)
    norms = torch.stack(_tensor_norms([t for ts in lists for t in ts], foreach)).pow(2.0)  # (n,)
    ends = list(itertools.accumulate(len(ts) for ts in lists))
    total = torch.stack([norms[a:b].sum() for a, b in zip([0, *ends[:-1]], ends)]).float()  # (G,)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(1.0 / 2.0)
    total.masked_fill_(total.isnan().logical_or(total.isinf()), -1.0)
    first, end = span
    if end > first:  # DeepSpeed's _average_expert_grad_norms, on the expert slice
        group = self.real_dp_process_group[first]
        experts = total[first:end] * 1.0 / dist.get_world_size(group=group)
        dist.all_reduce(experts, group=group)
        total = torch.cat([total[:first], experts, total[end:]])
    invalid = (~torch.isfinite(total) | (total < 0)).any()
    combined = torch.linalg.vector_norm(total, ord=2)
    self._eve_valid_norm = torch.where(invalid, torch.full_like(combined, float("inf")), combined)
    return self._eve_valid_norm


def _unscale_and_clip(self, grad_groups_flat, total_norm, *, original) -> None:
    """DeepSpeed's `unscale_and_clip_grads`, the invalid norm replaced by inf on the device. The factor
    depends on the global norm only, so it is computed once per step (for the first group) and reused."""
    if not isinstance(total_norm, Tensor) or self.clip_grad <= 0.0:
        return original(grad_groups_flat, total_norm)
    cached_norm, inverse = getattr(self, "_eve_clip", (None, None))
    if cached_norm is not total_norm:
        # `_global_norm`'s result is already finite and >= 0, or inf: the where() would return it as is.
        valid = total_norm is getattr(self, "_eve_valid_norm", None)
        clip_norm = (
            total_norm if valid else torch.where(_invalid(total_norm), float("inf"), total_norm.float())
        )
        clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        inverse = 1.0 / (clip * self.loss_scale)
        self._eve_clip = (total_norm, inverse)
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(inverse)


def make_step_sync_free(optimizer, foreach_norm: bool = False) -> bool:
    """Give a DeepSpeed ZeRO-1/2 optimizer the sync-free norm and clip (in place). -> whether it had them
    to replace (other wrappers are left as they are)."""
    names = ("get_grad_norm_direct", "unscale_and_clip_grads", "scaled_global_norm")
    if not all(hasattr(optimizer, m) for m in names):
        return False
    norm, clip, global_norm = (getattr(optimizer, m) for m in names)

    def grad_norm(self, gradients, params, norm_type=2):
        return _grad_norm(self, gradients, params, norm_type, original=norm, foreach=foreach_norm)

    def unscale_and_clip(self, grad_groups_flat, total_norm):
        return _unscale_and_clip(self, grad_groups_flat, total_norm, original=clip)

    def scaled_global_norm(self, norm_type=2):
        return _global_norm(self, norm_type, original=global_norm, foreach=foreach_norm)

    optimizer.get_grad_norm_direct = types.MethodType(grad_norm, optimizer)
    optimizer.unscale_and_clip_grads = types.MethodType(unscale_and_clip, optimizer)
    optimizer.scaled_global_norm = types.MethodType(scaled_global_norm, optimizer)
    return True
