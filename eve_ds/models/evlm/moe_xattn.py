"""EVLM-MoE: the cross-attention FFN as a world expert plus fine-grained routed experts on DeepSpeed's MoE.

`WorldMoE(x) = world(x) + tanh(beta) * MoE(x)`. The world expert is a separate FFN that every token uses
(DeepSpeed's `use_residual` is PR-MoE's softmax mix, not a shared expert). The routed part is DeepSpeed's
`MoE` with `k = top_k` (its `TopKGate` sends k > 2 to `topkgating`) and `drop_tokens=False`. `topkgating`
ignores `used_token`, so padding is removed before routing instead. With expert parallelism every MoE call
is collective, so a rank with no valid token still routes one (zero) token.

Upcycling (`upcycle`): world <- the dense FFN; routed expert g <- slice g % M of copy g // M of the dense
hidden units, so the M slices of a copy sum to the dense FFN. With beta = 0 the model equals the dense one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from timm.layers import SwiGLU
from torch import Tensor, nn

from eve_ds.models.evlm.xattn import build_ffn


class StackedSwiGLUExperts(Experts):
    """DeepSpeed's `Experts` (same modules and checkpoint names) computed as three batched matmuls over the
    local experts instead of a loop of 3 x E small ones. Experts must be bias-free timm `SwiGLU`s."""

    def __init__(self, expert: SwiGLU, num_local_experts: int, expert_group_name: str | None) -> None:
        if not isinstance(expert, SwiGLU) or expert.fc1_g.bias is not None:
            raise ValueError(f"StackedSwiGLUExperts needs bias-free timm SwiGLU experts, got {expert}")
        super().__init__(expert, num_local_experts, expert_group_name)

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs: (G, E, C, D), G = expert-parallel groups, E = local experts -> (G, E, C, D)."""
        G, E, C, D = inputs.shape
        experts = self.deepspeed_experts
        x = inputs.transpose(0, 1).reshape(E, G * C, D)
        wg = torch.stack([e.fc1_g.weight for e in experts])  # (E, F, D)
        wx = torch.stack([e.fc1_x.weight for e in experts])  # (E, F, D)
        w2 = torch.stack([e.fc2.weight for e in experts])  # (E, D, F)
        h = F.silu(torch.bmm(x, wg.transpose(1, 2))) * torch.bmm(x, wx.transpose(1, 2))  # (E, G*C, F)
        return torch.bmm(h, w2.transpose(1, 2)).view(E, G, C, D).transpose(0, 1)


class WorldMoE(nn.Module):
    """world(x) + tanh(beta) * top-k mixture of `num_experts` FFNs of `hidden` units (DeepSpeed `MoE`)."""

    def __init__(
        self,
        d: int,
        world_hidden: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        kind: str = "swiglu",
        ep_size: int = 1,
        drop_tokens: bool = False,
        capacity_factor: float = 1.0,
        beta_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.world = build_ffn(d, world_hidden, kind)
        expert = build_ffn(d, hidden, kind)
        self.moe = MoE(
            d,
            expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            drop_tokens=drop_tokens,
            use_rts=False,  # topkgating ignores it; say so
            top2_2nd_expert_sampling=False,
        )
        if kind == "swiglu":  # built like DeepSpeed's own Experts, in its place
            self.moe.deepspeed_moe.experts = StackedSwiGLUExperts(
                expert, self.moe.num_local_experts, self.moe.expert_group_name
            )
        self.beta = nn.Parameter(torch.full((1,), float(beta_init)))

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, S, D), valid: (B, S) bool or None -> (out (B, S, D), l_aux, expert counts (E,))."""
        flat = x.reshape(-1, x.shape[-1])
        idx = None if valid is None else valid.reshape(-1).nonzero().squeeze(1)
        tokens = flat if idx is None else flat.index_select(0, idx)  # (T, D): padding is never routed
        empty = tokens.shape[0] == 0
        if empty:  # the call is collective under expert parallelism: take part with one dummy token
            tokens = flat.new_zeros(1, flat.shape[1])
        routed, l_aux, counts = self.moe(tokens)
        routed = routed * self.beta.tanh().to(routed.dtype)
        out = self.world(flat)
        if not empty:
            out = out + routed if idx is None else out.index_add(0, idx, routed)
        else:
            out = out + 0.0 * routed.sum()  # keep the graph connected for the backward's collectives
        return out.view_as(x), l_aux, counts


def expert_slice(dense: nn.Module, g: int, slices: int) -> dict[str, Tensor]:
    """The state dict of routed expert g: hidden units of slice g % slices of the dense FFN (any copy)."""
    sd = dense.state_dict()
    first = next(k for k in sd if k.startswith("fc1"))
    w = sd[first].shape[0] // slices
    rows = slice((g % slices) * w, (g % slices + 1) * w)
    # fc1* weights: (F, D) -> rows; fc2 weight: (D, F) -> columns.
    return {k: (v[rows] if k.startswith("fc1") else v[:, rows]) for k, v in sd.items()}


@torch.no_grad()
def upcycle(
    dense: nn.Module,
    moe: WorldMoE,
    copies: int,
    slices: int,
    ep_rank: int = 0,
    noise: float = 0.0,
    seed: int = 0,
) -> None:
    """Fill `moe` from the dense FFN: world <- dense, local expert i <- slice of global expert
    g = ep_rank * n_local + i. The copies are identical unless `noise` > 0 adds N(0, noise^2) drawn from a
    generator seeded by (seed, g), so global expert g is the same for every ep_size either way."""
    n_local = len(moe.local_experts)
    if copies * slices != n_local * moe.moe.ep_size:
        raise ValueError(f"{copies} copies x {slices} slices != {n_local * moe.moe.ep_size} experts")
    moe.world.load_state_dict(dense.state_dict())
    for i, expert in enumerate(moe.local_experts):
        g = ep_rank * n_local + i
        expert.load_state_dict(expert_slice(dense, g, slices))
        if noise > 0:
            gen = torch.Generator().manual_seed(seed * 1009 + g)
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p) * noise)
