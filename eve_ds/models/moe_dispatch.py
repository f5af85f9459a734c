"""The soft router's experts without host syncs or capacity padding: sort the routes by expert, run every
local expert in one ``torch._grouped_mm`` per matmul.

Same parameters, routing and losses as :class:`eve_ds.models.moe.ModalityMoE` (DeepSpeed's ``TopKGate``
with sampling off, no-drop capacity), computed differently:

* every position of the (B, N) sequence is routed, text padding included, so all shapes are static
  (B·N·k rows); padding routes get the extra expert id E, sort last and are folded into the last group,
  computed and weighted by 0. DeepSpeed instead gathers the T real tokens (``nonzero``), pads every expert
  to the largest load C (``int(C)``: a sync; E·C rows, 1.8-3.1x the routes at EVE-Base's initialisation),
  and finds slots with an int64 ``cumsum`` over a (T, E) one-hot;
* the modality bias is added by slicing the sequence at ``n_image`` (the image part always comes first),
  not by indexing a (2, D) table with per-token ids, whose backward is a sort-based ``index_put``;
* expert loads are a ``scatter_add_`` into 2E bins (``bincount`` reads min/max to the host on CUDA);
* group offsets are an int32 ``cumsum`` over E counts and stay on the device.

The load-balancing loss and the per-route gate weights are DeepSpeed's ``top1gating`` / ``top2gating``
formulas over the real tokens.

With expert parallelism (``ep_size`` P > 1, DeepSpeed's expert-parallel group and expert modules, so the
same checkpoints) the routes, sorted by global expert, are exchanged with DeepSpeed's all-to-all in blocks
of a static size: each rank sends every rank a block of R = B·N·k rows (the most it could route there),
its routes to that rank's experts first, zeros after; the per-expert counts travel in a second, (P, E/P)
all-to-all and stay on the device. The receiver sorts the P·R rows by local expert and runs only the
real ones: ``_grouped_mm`` leaves rows past the last group end alone, and they are masked out. A
variable-size exchange would send only the real rows, but its split sizes must be on the host (one sync
per layer); the static blocks cost P·R rows on the wire per rank instead of about R. DeepSpeed's no-drop
layer sends E·C rows (every expert padded to the largest load), 1.8-3.1x the routes of EVE-Base at its
initialisation, so at P = 2 the static blocks move about as much as DeepSpeed does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.moe.sharded_moe import _AllToAll
from torch import Tensor

from eve_ds.models.moe import IMAGE, TEXT, ModalityMoE


def gate_input(moe: ModalityMoE, h: Tensor, n_image: int) -> Tensor:
    """h: (B, N, D) -> what the router sees, h + b_m with b_m chosen by slicing [image; text]."""
    bias = moe.gate.modality_bias
    if bias is None:
        return h
    N, D = h.shape[1:]
    b = torch.cat([bias[IMAGE].expand(n_image, D), bias[TEXT].expand(N - n_image, D)])  # (N, D)
    return h + b.to(h.dtype)


def route(moe: ModalityMoE, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routes of every position: x (B, N, D) what the router sees, valid (B, N) ->
    (expert ids (B·N, k) int64, gate weights (B·N, k) fp32, load-balancing loss), as DeepSpeed's gate.
    """
    gate, E = moe.gate, moe.num_experts
    x = x.reshape(-1, x.shape[-1])
    logits = F.linear(x.float(), gate.wg.weight.float())  # (B·N, E) fp32, like TopKGate
    gates = F.softmax(logits, dim=1)
    i1 = torch.argmax(gates, dim=1)
    g1 = gates.gather(1, i1[:, None])
    if gate.k == 2:
        # DeepSpeed takes the 2nd expert as the argmax of the logits with the 1st masked out.
        i2 = torch.argmax(logits.scatter(1, i1[:, None], float("-inf")), dim=1)
        g2 = gates.gather(1, i2[:, None])
        denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        ids, weights = torch.cat([i1[:, None], i2[:, None]], 1), torch.cat([g1 / denom, g2 / denom], 1)
    else:
        ids, weights = i1[:, None], g1
    # Loss over the real tokens only: me = mean gate, ce = share of first choices, per expert.
    real = valid.reshape(-1, 1).to(gates.dtype)  # (B·N, 1)
    num_real = real.sum()
    me = (gates * real).sum(0) / num_real
    ce = torch.zeros(E, dtype=gates.dtype, device=gates.device).scatter_add_(0, i1, real[:, 0]) / num_real
    l_aux = torch.mean(me * ce) * E * E if gate.k == 2 else torch.sum(me * ce) * E
    return ids, weights, l_aux


def expert_loads(ids: Tensor, valid: Tensor, n_image: int, num_experts: int) -> Tensor:
    """ids (B·N, k), valid (B, N) -> routes per (modality, expert) of the real tokens, (2, E) float."""
    B, N = valid.shape
    E = num_experts
    modality = (torch.arange(N, device=ids.device) >= n_image).long().expand(B, N).reshape(-1, 1)
    bins = torch.where(valid.reshape(-1, 1), modality * E + ids, 2 * E).reshape(-1)
    counts = torch.zeros(2 * E + 1, dtype=torch.float32, device=ids.device)
    return counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=counts.dtype))[: 2 * E].view(2, E)


def stacked_weights(moe: ModalityMoE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The local experts' Mlp parameters stacked: fc1 (E, F, D), (E, F); fc2 (E, D, F), (E, D)."""
    ex = moe.local_experts
    return (
        torch.stack([e.fc1.weight for e in ex]),
        torch.stack([e.fc1.bias for e in ex]),
        torch.stack([e.fc2.weight for e in ex]),
        torch.stack([e.fc2.bias for e in ex]),
    )


def grouped_experts(moe: ModalityMoE, hs: Tensor, expert: Tensor, offs: Tensor) -> Tensor:
    """hs: (R, D) routes sorted by expert, expert: (R,) their expert ids, offs: (E,) int32 group ends
    -> (R, D) the GELU Mlp of each route's expert (padding rows: the last expert's)."""
    w1, b1, w2, b2 = stacked_weights(moe)
    a = F.gelu(torch._grouped_mm(hs, w1.transpose(1, 2), offs=offs) + b1.index_select(0, expert))
    return torch._grouped_mm(a, w2.transpose(1, 2), offs=offs) + b2.index_select(0, expert)


def masked_experts(moe: ModalityMoE, xs: Tensor, expert: Tensor, counts: Tensor) -> Tensor:
    """xs: (M, D) rows sorted by local expert, the counts (E_local,) first, other rows after; expert: (M,)
    their local expert ids (past the last: any) -> (M, D) the Mlp of each counted row's expert, 0 on the
    other rows. ``_grouped_mm`` does not compute those (nor their input gradients): whatever its output
    holds there is replaced with ``where``, before anything multiplies it (0 * nan is nan)."""
    w1, b1, w2, b2 = stacked_weights(moe)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    keep = (torch.arange(xs.shape[0], device=xs.device) < offs[-1])[:, None]  # (M, 1)
    e = expert.clamp(max=w1.shape[0] - 1)
    h = torch.where(keep, torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs), 0.0)
    a = torch.where(keep, F.gelu(h + b1.index_select(0, e)), 0.0)  # no gradient to b1 from other rows
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs) + b2.index_select(0, e)
    return torch.where(keep, y, 0.0)


def send_slots(sorted_ids: Tensor, counts: Tensor, ep_size: int) -> Tensor:
    """sorted_ids: (R,) global expert ids sorted (E: padding, last), counts: (E,) routes per expert
    -> (R,) each route's row in the (P·R,) send buffer: block p (rows p·R ...) holds, in order, the routes
    to rank p's experts; padding routes get the extra row P·R."""
    R, P = sorted_ids.shape[0], ep_size
    E = counts.shape[0]
    per_rank = counts.view(P, E // P).sum(1, dtype=torch.long)  # (P,)
    start = torch.cumsum(per_rank, 0) - per_rank  # (P,) first sorted route of each rank's block
    dest = torch.div(sorted_ids, E // P, rounding_mode="floor").clamp(max=P - 1)
    j = torch.arange(R, device=sorted_ids.device)
    return torch.where(sorted_ids < E, dest * R + j - start[dest], P * R)


def expert_parallel(moe: ModalityMoE, hs: Tensor, sorted_ids: Tensor, counts: Tensor) -> Tensor:
    """hs: (R, D) routes sorted by global expert, sorted_ids: (R,) their ids (E: padding), counts: (E,)
    int32 -> (R, D) the expert outputs of the routes (padding routes: any finite value), computed on the
    ranks that hold the experts. No host sync: every shape is static."""
    group, P = moe.deepspeed_moe.ep_group, moe.ep_size
    (R, D), n_local = hs.shape, moe.num_local_experts
    slot = send_slots(sorted_ids, counts, P)
    send = hs.new_zeros(P * R + 1, D).index_copy(0, slot, hs)[: P * R]
    recv_counts = torch.empty_like(counts).view(P, n_local)  # (source rank, local expert)
    dist.all_to_all_single(recv_counts, counts.view(P, n_local).contiguous(), group=group)
    recv = _AllToAll.apply(group, send)  # (P·R, D): block s from rank s, sorted by local expert
    pos = torch.arange(R, device=hs.device).expand(P, R).contiguous()
    local = torch.searchsorted(torch.cumsum(recv_counts, 1), pos, right=True).reshape(-1)  # n_local: none
    order = torch.argsort(local, stable=True)  # by local expert, then source rank: one group per expert
    y = masked_experts(moe, recv.index_select(0, order), local.index_select(0, order), recv_counts.sum(0))
    back = _AllToAll.apply(group, torch.zeros_like(y).index_copy(0, order, y))  # (P·R, D), as sent
    return back.index_select(0, slot.clamp(max=P * R - 1))


def grouped_moe(moe: ModalityMoE, h: Tensor, valid: Tensor, n_image: int) -> tuple[Tensor, Tensor, Tensor]:
    """h: (B, N, D) normed tokens, valid: (B, N) True on real tokens, image part first (n_image long)
    -> (out (B, N, D), l_aux, expert counts (2, E)), as ``SoftRouterFFN`` returns them; padding rows 0."""
    B, N, D = h.shape
    E, k = moe.num_experts, moe.gate.k
    x = gate_input(moe, h, n_image)
    ids, weights, l_aux = route(moe, x, valid)
    if moe.gate.bias_in_input:  # model.modality_bias_to_experts: the experts see h + b_m too
        h = x
    flat = torch.where(valid.reshape(-1, 1), ids, E).reshape(-1)  # (B·N·k,); padding -> E
    order = torch.argsort(flat, stable=True)
    sizes = torch.zeros(E + 1, dtype=torch.int32, device=h.device)
    sizes.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    sorted_ids = flat.index_select(0, order)
    token = torch.div(order, k, rounding_mode="floor")  # route r belongs to token r // k
    hs = h.reshape(B * N, D).index_select(0, token)
    if moe.ep_size > 1:
        y = expert_parallel(moe, hs, sorted_ids, sizes[:E])
    else:
        # Group ends; the padding rows (sorted last) are folded into the last group so that every row is
        # written (rows past the last end would be left uninitialised).
        offs = torch.cumsum(sizes[:E], 0, dtype=torch.int32) + F.pad(sizes[E:], (E - 1, 0))
        y = grouped_experts(moe, hs, sorted_ids.clamp(max=E - 1), offs)
    w = torch.where(sorted_ids < E, weights.reshape(-1).index_select(0, order), 0.0)  # (B·N·k,) fp32
    # Weighted in fp32 and summed over a token's routes, then cast, as DeepSpeed's combine does.
    out = torch.zeros(B * N, D, dtype=torch.float32, device=h.device).index_add_(
        0, token, y.float() * w[:, None]
    )
    counts = expert_loads(ids, valid, n_image, E)
    return out.to(h.dtype).view(B, N, D), l_aux, counts
