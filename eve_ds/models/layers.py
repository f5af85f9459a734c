"""Blocks of the shared encoder: one self-attention for both modalities, a hard- or soft-router FFN."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, gen_relative_position_index, trunc_normal_
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from eve_ds.models.config import EVEConfig
from eve_ds.models.moe import ACT_LAYERS, IMAGE, TEXT, ModalityMoE
from eve_ds.models.moe_dispatch import grouped_moe


def init_weights(m: nn.Module, std: float) -> None:
    """BEiT/MAE initialisation of one module: truncated normal for Linear and Embedding weights, zero
    biases, unit LayerNorm (use with `module.apply`)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        trunc_normal_(m.weight, std=std)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@dataclass
class Tokens:
    """What every block needs to know about the token sequence [image; text].

    n_image: length of the image part (image [CLS] + the patches that entered), 0 when there is no image.
    patch_ids: (B, n_image - 1) indices of those patches in the full grid, None when all patches entered.
    key_padding: (B, N) True on text padding, None when there is none.
    valid: (B, N) True on real tokens (everything but text padding).
    valid_index: (T,) positions of the real tokens in the flattened (B * N) sequence, computed once per
        forward pass (the soft-router blocks gather and scatter with it: no host synchronisation each).
    num_real: T when the host knows it (the data path counts the real text tokens): the index then has a
        static size and is found without reading the device; None finds it with `nonzero` (a host sync).
    block_mask: FlexAttention's mask of the padded keys (`padding_block_mask`), built once per forward pass
        for `attention_kernel="flex"`; None when there is no padding or another kernel runs.
    padding_bias: (B, 1, 1, N) 0 on real keys, `padding_fill` on padded ones, in the blocks' dtype: the
        float mask of the padding that every block would make (the additive mask's part, or what SDPA makes
        of the boolean mask), made once per forward pass (`padding_bias`); the blocks' outputs are bit for
        bit the same. None when there is no padding or the kernel is "flex".
    """

    n_image: int
    patch_ids: Tensor | None
    key_padding: Tensor | None
    valid: Tensor
    valid_index: Tensor | None = None
    num_real: int | None = None
    block_mask: BlockMask | None = None
    padding_bias: Tensor | None = None

    def real_index(self) -> Tensor:
        if self.valid_index is None:
            flat = self.valid.reshape(-1)
            if self.num_real is None:
                self.valid_index = flat.nonzero().squeeze(1)
            else:
                # The same positions in the same order; sync-free on CUDA (a static output size).
                self.valid_index = torch.nonzero_static(flat, size=self.num_real).squeeze(1)
        return self.valid_index


def padding_fill(kernel: str, rel: bool, dtype: torch.dtype) -> float:
    """The additive mask's value on padded keys in `Attention`: SDPA's own -inf for the boolean mask of the
    "sdpa" kernel, the float mask's finfo.min when the relative position bias (`rel`) or "sdpa_bias" is on."""
    return float("-inf") if kernel != "sdpa_bias" and not rel else torch.finfo(dtype).min


def padding_bias(key_padding: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
    """key_padding (B, N) True on padded keys -> (B, 1, 1, N): 0, or `fill` on the padded keys."""
    neg = torch.zeros(key_padding.shape, dtype=dtype, device=key_padding.device)
    return neg.masked_fill(key_padding, fill)[:, None, None, :]


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias among image tokens: a learned (2G-1)^2 + 3 entry table per head,
    the 3 extra entries for cls->patch, patch->cls and cls->cls."""

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__()
        self.num_relative_distance = (2 * grid - 1) ** 2 + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        # (1 + P, 1 + P) into the table, the cls rows and column on the 3 extra entries: BEiT's layout
        index = gen_relative_position_index((grid, grid), class_token=True)
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, patch_ids: Tensor | None) -> Tensor:
        """-> (H, n, n) for all 1 + P image tokens, or (B, H, n, n) for [cls; patches[patch_ids]]."""
        table = self.relative_position_bias_table
        if patch_ids is None:
            index = self.relative_position_index
        else:
            ids = torch.cat([patch_ids.new_zeros(patch_ids.shape[0], 1), patch_ids + 1], dim=1)  # (B, n)
            index = self.relative_position_index[ids[:, :, None], ids[:, None, :]]  # (B, n, n)
        # index_select rather than table[index]: its backward is one index_add_ instead of the sort-based
        # kernel of advanced indexing (2-3 ms per call on an H200 at EVE-Base size).
        bias = table.index_select(0, index.reshape(-1)).view(*index.shape, -1)
        return bias.permute(2, 0, 1) if patch_ids is None else bias.permute(0, 3, 1, 2)

    def score_mod(self, patch_ids: Tensor | None, n_image: int) -> Callable:
        """FlexAttention's score_mod adding the bias that `forward` builds to the image-image scores of a
        sequence [image (n_image); text]: looked up per score, nothing (B, H, N, N) is materialised.

        The image token at position i is grid position pos[i] (0: the [CLS]; patch p: p + 1), and its bias
        to the token at j is table[relative_position_index[pos[i], pos[j]], h]."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        pos = None
        if patch_ids is not None:
            pos = torch.cat([patch_ids.new_zeros(patch_ids.shape[0], 1), patch_ids + 1], dim=1)  # (B, n)
        last = n_image - 1

        def add_bias(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            qi, ki = q.clamp(max=last), k.clamp(max=last)  # text positions read a valid entry, then get 0
            if pos is not None:
                qi, ki = pos[b, qi], pos[b, ki]
            bias = table[index[qi, ki], h]
            return score + torch.where((q <= last) & (k <= last), bias, 0).to(score.dtype)

        return add_bias


def padding_block_mask(key_padding: Tensor) -> BlockMask:
    """key_padding: (B, N) True on padded keys -> FlexAttention's block mask hiding them from every query."""
    B, N = key_padding.shape

    def keep(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return ~key_padding[b, k]

    return create_block_mask(keep, B, None, N, N, device=key_padding.device)


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def flex(q: Tensor, k: Tensor, v: Tensor, score_mod: Callable | None, block_mask: BlockMask | None) -> Tensor:
    """FlexAttention of q, k, v (B, H, N, D / H): compiled into one fused kernel on CUDA; inside a compiled
    region it is traced into that region's graph; on CPU torch's unfused implementation (forward only:
    torch 2.14 has no FlexAttention backward on CPU)."""
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if q.device.type == "cuda":
        return _compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask)
    with warnings.catch_warnings():  # the unfused implementation is the point here, not a mistake
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


class Attention(nn.Module):
    """Multi-head self-attention shared by both modalities, with BEiT's q/v-only biases.

    The kernel (`EVEConfig.attention_kernel`), the same attention to float precision:
    * "sdpa_bias": SDPA with one additive float mask (B or 1, H or 1, N, N) holding the relative position
      bias and finfo.min on padded keys (the reference; on CUDA the memory-efficient kernel);
    * "sdpa": SDPA with no mask when nothing needs one (flash-eligible), a boolean key mask when only
      padding does, the float mask above when the relative position bias does;
    * "flex": FlexAttention, the bias added per score (`RelativePositionBias.score_mod`), padding as a
      block mask (`Tokens.block_mask`); SDPA with no mask when there is neither.
    """

    def __init__(self, cfg: EVEConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(d))
            self.v_bias = nn.Parameter(torch.zeros(d))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(d, d)
        self.rel_pos = RelativePositionBias(cfg.grid_size, cfg.num_heads) if cfg.rel_pos_bias else None
        self.kernel = cfg.attention_kernel

    def attn_bias(self, tokens: Tokens, n: int, dtype: torch.dtype) -> Tensor | None:
        """Additive mask (B or 1, H or 1, N, N): relative position bias on the image block, -inf on padding."""
        bias = None
        if self.rel_pos is not None and tokens.n_image > 0:
            rel = self.rel_pos(tokens.patch_ids)
            rel = rel if rel.dim() == 4 else rel.unsqueeze(0)
            pad = n - tokens.n_image
            bias = F.pad(rel, (0, pad, 0, pad)).to(dtype)
        if tokens.key_padding is not None:
            neg = tokens.padding_bias
            if neg is None or neg.dtype != dtype:
                neg = padding_bias(tokens.key_padding, torch.finfo(dtype).min, dtype)
            bias = neg if bias is None else bias + neg
        return bias

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, N, D) -> q, k, v, each (B, H, N, D / H)."""
        B, N, D = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads, D // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor, tokens: Tokens) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        q, k, v = self.heads(x)
        rel = self.rel_pos is not None and tokens.n_image > 0
        if self.kernel == "flex" and (rel or tokens.key_padding is not None):
            score_mod = self.rel_pos.score_mod(tokens.patch_ids, tokens.n_image) if rel else None
            if tokens.key_padding is not None and tokens.block_mask is None:
                tokens.block_mask = padding_block_mask(tokens.key_padding)
            out = flex(q, k, v, score_mod, tokens.block_mask)
        elif self.kernel == "sdpa_bias" or rel:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_bias(tokens, N, q.dtype))
        else:  # "sdpa", or "flex" with nothing to mask
            mask = tokens.padding_bias
            if tokens.key_padding is not None and (mask is None or mask.dtype != q.dtype):
                mask = ~tokens.key_padding[:, None, None, :]  # SDPA turns it into `padding_bias` itself
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class HardRouterFFN(nn.Module):
    """One pre-norm FFN per modality; token i goes to the FFN of its modality (no gate, no loss)."""

    def __init__(self, cfg: EVEConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_size
        self.norm_image = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.norm_text = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ffn_image = Mlp(d, f, act_layer=ACT_LAYERS[cfg.ffn_act])
        self.ffn_text = Mlp(d, f, act_layer=ACT_LAYERS[cfg.ffn_act])

    def forward(self, x: Tensor, tokens: Tokens) -> tuple[Tensor, Tensor | None, Tensor | None]:
        # The image part is always first, so the split is a slice, not a gather.
        n = tokens.n_image
        parts = []
        if n > 0:
            parts.append(self.ffn_image(self.norm_image(x[:, :n])))
        if n < x.shape[1]:
            parts.append(self.ffn_text(self.norm_text(x[:, n:])))
        return torch.cat(parts, dim=1), None, None


class SoftRouterFFN(nn.Module):
    """Pre-norm modality-aware MoE over the real tokens (text padding never reaches the router)."""

    def __init__(self, cfg: EVEConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.moe = ModalityMoE(
            cfg.hidden_size,
            cfg.ffn_size,
            cfg.num_experts,
            cfg.ep_size,
            cfg.top_k,
            cfg.drop_tokens,
            cfg.capacity_factor,
            cfg.modality_routing,
            cfg.top2_second_expert_sampling,
            cfg.expert_impl,
            cfg.ffn_act,
            cfg.modality_bias_to_experts,
        )
        self.dispatch = cfg.moe_dispatch

    def forward(self, x: Tensor, tokens: Tokens) -> tuple[Tensor, Tensor, Tensor]:
        """-> (out (B, N, D), l_aux, expert counts (2, E): routes per expert of image / text tokens)."""
        if self.dispatch == "grouped":
            return grouped_moe(self.moe, self.norm(x), tokens.valid, tokens.n_image)
        B, N, D = x.shape
        h = self.norm(x).reshape(B * N, D)
        index = tokens.real_index()  # (T,)
        modality = torch.where(index % N < tokens.n_image, IMAGE, TEXT)
        routed, l_aux, routes = self.moe(h.index_select(0, index), modality)
        out = torch.zeros_like(h).index_copy(0, index, routed.to(h.dtype)).view(B, N, D)
        # Routes per (modality, expert); DeepSpeed marks routes over capacity (drop_tokens=True) with -1:
        # they count in an extra bin that is dropped. A scatter_add_ into fixed bins, not bincount: bincount
        # reads min/max to the host on CUDA. The counts are integers, exact in float32 below 2^24.
        E = self.moe.num_experts
        routes = routes.long()
        bins = torch.where(routes >= 0, modality * E + routes, 2 * E).reshape(-1)  # (k * T,)
        counts = torch.zeros(2 * E + 1, dtype=torch.float32, device=bins.device)
        counts = counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=counts.dtype))[: 2 * E].view(2, E)
        return out, l_aux, counts


class Block(nn.Module):
    """Pre-norm block: x += γ1 · Attn(LN(x)); x += γ2 · FFN(x), FFN = hard or soft router (own norms)."""

    def __init__(self, cfg: EVEConfig, soft: bool, drop_path: float) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.soft = soft
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn = SoftRouterFFN(cfg) if soft else HardRouterFFN(cfg)
        if cfg.layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(cfg.layer_scale_init * torch.ones(d))
            self.gamma_2 = nn.Parameter(cfg.layer_scale_init * torch.ones(d))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, tokens: Tokens) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x: (B, N, D) -> (x, l_aux or None, expert counts (2, E) or None)."""
        a = self.attn(self.norm1(x), tokens)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        f, l_aux, counts = self.ffn(x, tokens)
        x = x + self.drop_path(f if self.gamma_2 is None else self.gamma_2 * f)
        return x, l_aux, counts
