"""Soft router: DeepSpeed's MoE with modality routing (paper eq. 6-7).

The router of a soft-router block sees ``x + b_m`` (``b_m`` a learned vector per modality), the experts see
``x``. Everything else — top-k gating, no-drop capacity, all-to-all across the expert-parallel group, the
load-balancing loss — is DeepSpeed's own code.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from timm.layers import Mlp
from torch import Tensor, nn

IMAGE, TEXT = 0, 1


class ModalityTopKGate(TopKGate):
    """DeepSpeed's TopKGate whose logits are ``W (x + b_m)`` instead of ``W x``.

    ``modality`` (T,) must be set by the owning layer right before each call; the gate also keeps the
    routes of its last call (``last_indices``: (k, T) global expert ids) for the expert-load statistics.
    """

    def __init__(self, model_dim: int, num_experts: int, modality_routing: bool, **kwargs) -> None:
        super().__init__(model_dim, num_experts, **kwargs)
        self.modality_bias = nn.Parameter(torch.zeros(2, model_dim)) if modality_routing else None
        self.modality: Tensor | None = None
        self.last_indices: Tensor | None = None

    def forward(
        self,
        input: Tensor,
        used_token: Tensor | None = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ):
        if self.modality_bias is not None:
            if self.modality is None or self.modality.shape[0] != input.shape[0]:
                raise RuntimeError("ModalityTopKGate: modality ids must be set for every routed token")
            input = input + self.modality_bias[self.modality].to(input.dtype)
        out = super().forward(input, used_token, sparse_routes, use_tutel)
        self.last_indices = out[3].detach() if sparse_routes else None
        return out

    def router_logits(self, x: Tensor, modality: Tensor) -> Tensor:
        """Router logits (T, E) for tokens x (T, D) — eq. 6, for inspection and tests."""
        if self.modality_bias is not None:
            x = x + self.modality_bias[modality].to(x.dtype)
        return torch.nn.functional.linear(x.float(), self.wg.weight.float())


class ModalityMoE(MoE):
    """``deepspeed.moe.layer.MoE`` with a :class:`ModalityTopKGate`; experts are timm ``Mlp`` FFNs."""

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        ep_size: int,
        top_k: int,
        drop_tokens: bool,
        capacity_factor: float,
        modality_routing: bool,
        second_expert_sampling: bool,
    ) -> None:
        expert = Mlp(hidden_size, ffn_size, act_layer=nn.GELU)
        super().__init__(
            hidden_size,
            expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            drop_tokens=drop_tokens,
            use_rts=False,
            top2_2nd_expert_sampling=second_expert_sampling,
        )
        self.deepspeed_moe.gate = ModalityTopKGate(
            hidden_size,
            num_experts,
            modality_routing,
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=4,
            drop_tokens=drop_tokens,
            use_rts=False,
            top2_2nd_expert_sampling=second_expert_sampling,
        )

    @property
    def gate(self) -> ModalityTopKGate:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (T, D) tokens, modality: (T,) in {IMAGE, TEXT} -> (out (T, D), l_aux, routes (k, T))."""
        self.gate.modality = modality
        try:
            out, l_aux, _ = super().forward(x)
        finally:
            self.gate.modality = None
        return out, l_aux, self.gate.last_indices

    @torch.no_grad()
    def init_experts(self, ep_rank: int, seed: int, std: float) -> None:
        """Initialise the local experts so that global expert g always gets the same weights,
        whatever ep_size is: each draws from its own generator seeded by (seed, g)."""
        n_local = len(self.local_experts)
        for i, expert in enumerate(self.local_experts):
            g = ep_rank * n_local + i
            gen = torch.Generator().manual_seed(seed * 1009 + g)
            for name, p in expert.named_parameters():
                if p.is_meta:  # built on the meta device (e.g. to count parameters): nothing to fill
                    continue
                if name.endswith("weight"):
                    # Drawn on the CPU (where `gen` lives), whatever the default device, then copied.
                    w = torch.empty(p.shape, device="cpu").normal_(0.0, std, generator=gen)
                    w = w.clamp_(-2 * std, 2 * std)
                    p.copy_(w)
                else:
                    p.zero_()
