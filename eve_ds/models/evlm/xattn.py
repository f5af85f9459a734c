"""Tanh-gated cross-attention from LM tokens to ViT features (EVLM Sec. 2; Flamingo's gating).

Queries come from the LM width h (projected to r_xc * h), keys and values straight from the ViT width with
no bias, so the all-zero null feature appended to every row's keys gives k = v = 0: a query that may see no
image attends to it alone and gets exactly 0 (the output projection has no bias either). Which image
slots a query sees is the interval [lo, hi] of `Media` (see `masks.py`); every query also sees the null key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLU
from torch import Tensor, nn


@dataclass
class Media:
    """What every wrapped decoder layer reads.

    feats: one (B, M, P, Dv) tensor per feature level (M image slots per row, P tokens per image);
    lo, hi: (B, S) the first and last slot each query sees (lo = -1: the null key only);
    valid: (B, S) bool, False on padding (no MoE routing there), or None when every token is real.
    """

    feats: list[Tensor]
    lo: Tensor
    hi: Tensor
    valid: Tensor | None = None

    def for_queries(self, n: int) -> tuple[Tensor, Tensor]:
        """lo, hi for n queries: all of them, or (cached decoding) n new tokens continuing the last one."""
        if n == self.lo.shape[1]:
            return self.lo, self.hi
        return self.lo[:, -1:].expand(-1, n), self.hi[:, -1:].expand(-1, n)


def build_ffn(d: int, hidden: int, kind: str) -> nn.Module:
    """The cross-attention FFN: timm's SwiGLU or GELU Mlp, bias-free like the LM's own MLP."""
    if kind == "swiglu":
        return SwiGLU(d, hidden, bias=False)
    if kind == "gelu":
        return Mlp(d, hidden, bias=False)
    raise ValueError(f"xattn_ffn={kind!r}: expected swiglu | gelu")


def allowed_keys(lo: Tensor, hi: Tensor, num_slots: int, per_slot: int) -> Tensor:
    """lo, hi: (B, S) -> (B, S, M * P + 1) bool: key j (slot j // P) is in [lo, hi]; the null key always."""
    slot = torch.arange(num_slots * per_slot, device=lo.device) // per_slot
    inside = (slot >= lo[..., None]) & (slot <= hi[..., None])
    return torch.cat([inside, inside.new_ones(*lo.shape, 1)], dim=-1)


class GatedXAttn(nn.Module):
    """x + tanh(a_attn) * XAttn(RMSNorm(x), feats); then x + tanh(a_ff) * FFN(RMSNorm(x)).

    `ffn` is the dense FFN or a `WorldMoE` (called with the valid-token mask). With
    `ffn_on_imageless_text=False` the FFN output is zeroed where a query sees no image (as Mllama does).
    """

    def __init__(
        self,
        d: int,
        dv: int,
        inner: int,
        heads: int,
        ffn: nn.Module,
        gate_init: float = 0.0,
        ffn_on_imageless_text: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(d, eps=eps)
        self.q = nn.Linear(d, inner, bias=False)
        self.k = nn.Linear(dv, inner, bias=False)  # no bias: the null feature must give k = 0
        self.v = nn.Linear(dv, inner, bias=False)
        self.o = nn.Linear(inner, d, bias=False)  # no bias: attending to the null key alone gives 0
        self.ff_norm = nn.RMSNorm(d, eps=eps)
        self.ffn = ffn
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.ff_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.ffn_on_imageless_text = ffn_on_imageless_text
        self.last_aux: Tensor | None = None  # the MoE's load-balancing loss of the last call
        self.last_routes: Tensor | None = None

    def attend(self, x: Tensor, feats: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """x: (B, S, d), feats: (B, M, P, dv), lo / hi: (B, S) -> (B, S, d)."""
        B, S, _ = x.shape
        M, P = feats.shape[1:3]
        kv = feats.reshape(B, M * P, -1).to(x.dtype)
        kv = torch.cat([kv, kv.new_zeros(B, 1, kv.shape[-1])], dim=1)  # + the null feature

        def split(t: Tensor) -> Tensor:  # (B, N, inner) -> (B, H, N, inner / H)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.q(self.norm(x))), split(self.k(kv)), split(self.v(kv))
        mask = allowed_keys(lo, hi, M, P)[:, None]  # (B, 1, S, M * P + 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(B, S, -1))

    def run_ffn(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """x: (B, S, d) -> (B, S, d); a MoE FFN routes only the valid tokens and records its aux loss."""
        if not hasattr(self.ffn, "beta"):  # dense
            return self.ffn(x)
        out, self.last_aux, self.last_routes = self.ffn(x, valid)
        return out

    def forward(
        self, x: Tensor, feats: Tensor, lo: Tensor, hi: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """x: (B, S, d) LM hidden states -> (B, S, d)."""
        x = x + self.attn_gate.tanh() * self.attend(x, feats, lo, hi)
        y = self.run_ffn(self.ff_norm(x), valid)
        if not self.ffn_on_imageless_text:
            y = y * (lo >= 0)[..., None].to(y.dtype)
        return x + self.ff_gate.tanh() * y
