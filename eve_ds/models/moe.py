"""Soft router: DeepSpeed's MoE with modality routing (paper eq. 6-7).

The router of a soft-router block sees ``x + b_m`` (``b_m`` a learned vector per modality), the experts see
``x`` (or ``x + b_m`` too, ``bias_to_experts``: the official release's MoE adds b_m to the layer's input,
so its experts see it as well). Everything else — top-k gating, no-drop capacity, all-to-all across the expert-parallel group, the
load-balancing loss — is DeepSpeed's own code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from timm.layers import Mlp, QuickGELU
from timm.layers.activations import quick_gelu
from torch import Tensor, nn

IMAGE, TEXT = 0, 1
# model.ffn_act -> the FFN activation module (every hard-router FFN and expert) and its function.
ACT_LAYERS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def _act_function(act: nn.Module):
    """The function of an FFN activation module that StackedExperts can batch, or None."""
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return F.gelu
    return quick_gelu if isinstance(act, QuickGELU) else None


class ModalityTopKGate(TopKGate):
    """DeepSpeed's TopKGate whose logits are ``W (x + b_m)`` instead of ``W x``.

    ``modality`` (T,) must be set by the owning layer right before each call; the gate also keeps the
    routes of its last call (``last_indices``: (k, T) global expert ids) for the expert-load statistics.
    With ``bias_in_input`` the owning layer has already added ``b_m`` to the input (the experts see it
    too), so the gate must not add it again.
    """

    def __init__(
        self, model_dim: int, num_experts: int, modality_routing: bool, bias_in_input: bool = False, **kwargs
    ) -> None:
        super().__init__(model_dim, num_experts, **kwargs)
        self.modality_bias = nn.Parameter(torch.zeros(2, model_dim)) if modality_routing else None
        self.bias_in_input = bias_in_input
        self.modality: Tensor | None = None
        self.last_indices: Tensor | None = None

    def forward(
        self,
        input: Tensor,
        used_token: Tensor | None = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ):
        if self.modality_bias is not None and not self.bias_in_input:
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


class StackedExperts(Experts):
    """DeepSpeed's ``Experts`` (same modules, parameters and checkpoint names) computed as two batched
    matmuls over all local experts instead of a Python loop of 2 x E small ones: E times fewer kernel
    launches in the forward and the backward pass. The experts must be plain ``Mlp``s with an exact GELU
    or a quick GELU and without dropout (what :class:`ModalityMoE` builds)."""

    def __init__(self, expert: Mlp, num_local_experts: int, expert_group_name: str | None) -> None:
        act = _act_function(expert.act)
        plain = act is not None
        for m in (expert.drop1, expert.norm, expert.drop2):
            plain &= isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0)
        if not plain:
            raise ValueError(
                f"StackedExperts needs GELU / quick GELU Mlp experts without dropout or norm, got {expert}"
            )
        super().__init__(expert, num_local_experts, expert_group_name)
        self.act = act  # a function, not a module: nothing is added to the state dict

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs: (G, E, C, D), G = expert-parallel groups, E = local experts -> (G, E, C, D)."""
        G, E, C, D = inputs.shape
        experts = self.deepspeed_experts
        x = inputs.transpose(0, 1).reshape(E, G * C, D)
        w1 = torch.stack([e.fc1.weight for e in experts])  # (E, F, D)
        b1 = torch.stack([e.fc1.bias for e in experts])  # (E, F)
        h = self.act(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))  # (E, G*C, F)
        w2 = torch.stack([e.fc2.weight for e in experts])  # (E, D, F)
        b2 = torch.stack([e.fc2.bias for e in experts])  # (E, D)
        out = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # (E, G*C, D)
        return out.view(E, G, C, D).transpose(0, 1)


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
        expert_impl: str = "stacked",
        ffn_act: str = "gelu",
        bias_to_experts: bool = False,
    ) -> None:
        expert = Mlp(hidden_size, ffn_size, act_layer=ACT_LAYERS[ffn_act])
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
            bias_to_experts,
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=4,
            drop_tokens=drop_tokens,
            use_rts=False,
            top2_2nd_expert_sampling=second_expert_sampling,
        )
        if expert_impl == "stacked":
            # Built like DeepSpeed's own (MoE.__init__), in its place: same copies, flags and names.
            self.deepspeed_moe.experts = StackedExperts(
                expert, self.num_local_experts, self.expert_group_name
            )
        elif expert_impl != "loop":
            raise ValueError(f"expert_impl must be 'stacked' or 'loop', got {expert_impl!r}")

    @property
    def gate(self) -> ModalityTopKGate:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (T, D) tokens, modality: (T,) in {IMAGE, TEXT} -> (out (T, D), l_aux, routes (k, T))."""
        if self.gate.bias_in_input:  # router and experts both see x + b_m
            x = x + self.gate.modality_bias[modality].to(x.dtype)
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
