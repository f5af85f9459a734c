"""Model configuration and the named flavors (eve_tiny, eve_base, eve_large)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eve_ds.utils.config import ConfigError, check

FFN_ACTS = ("gelu", "quick_gelu")
ATTENTION_KERNELS = ("sdpa_bias", "sdpa", "flex")


@dataclass
class EVEConfig:
    """Architecture of EVE: a shared Transformer over [image; text] with hard- and soft-router FFNs.

    Defaults are EVE-Base as described in the paper (Sec. 3, 4.1).
    """

    # Inputs (paper eq. 1-3).
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 30522  # BERT uncased WordPiece vocabulary
    max_text_len: int = 40  # text positions, including [CLS] and [SEP]
    pad_token_id: int = 0

    # Shared encoder.
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    ffn_size: int = 3072
    qkv_bias: bool = True  # BEiT v2 style: q and v biases, no k bias
    layer_scale_init: float | None = 0.1  # layer scale gamma on both residual branches; None disables it
    rel_pos_bias: bool = True  # per-block relative position bias among image tokens (BEiT v2)
    # [ours] how attention runs (eve_ds.models.layers.Attention; the same attention to float precision):
    # "sdpa_bias" = SDPA with one additive float mask (relative position bias + padding), the reference;
    # "sdpa" = SDPA with no mask when nothing needs one (flash-eligible), a boolean mask for padding alone;
    # "flex" = FlexAttention: the bias added per score, padding as a block mask (no CPU backward in torch).
    attention_kernel: str = "sdpa_bias"
    # Absolute image position embedding: "learned" (BEiT v2 / EVE: a trained table, initialised at init_std)
    # or "sincos" (MAE's fixed 2-D sin-cos table, values in [-1, 1], not trained; the image [CLS] gets 0).
    pos_embed: str = "learned"
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Options of the official EVE release's model (defaults: off, today's numerics). `text_embed_norm`: a
    # LayerNorm on the word embeddings before positions and types are added, followed by dropout
    # `text_embed_dropout` in training; `embed_norm`: a LayerNorm on the whole input sequence before block 0.
    text_embed_norm: bool = False
    text_embed_dropout: float = 0.0
    embed_norm: bool = False
    ffn_act: str = "gelu"  # every FFN and expert: "gelu" (exact) | "quick_gelu" (x * sigmoid(1.702 x))
    # How an image position table is resampled to another grid when weights are loaded: timm's bicubic
    # with antialiasing (true) or plain bicubic interpolation (false, the official release's).
    pos_resample_antialias: bool = True

    # Soft router (modality-aware MoE) on the top blocks; the others use the hard router.
    soft_router_blocks: list[int] | None = None  # 0-based; None -> the top `num_soft_blocks` blocks
    num_soft_blocks: int = 2
    num_experts: int = 32
    top_k: int = 2
    ep_size: int = 1
    drop_tokens: bool = False  # the paper's best-effort routing: no token is ever dropped
    capacity_factor: float = 1.0  # only used when drop_tokens is True
    modality_routing: bool = True  # router logits = W (x + b_m), paper eq. 6
    # The experts see x + b_m too (the official release's MoE), not only the router; needs modality_routing.
    modality_bias_to_experts: bool = False
    top2_second_expert_sampling: bool = False  # DeepSpeed's Gumbel-noise 2nd expert; off = plain top-2
    # [ours] how the local experts run: "stacked" = two batched matmuls over all experts (one launch each),
    # "loop" = DeepSpeed's Experts, one FFN call per expert. Same parameters and checkpoint names.
    expert_impl: str = "stacked"
    # [ours] how tokens reach the experts: "deepspeed" = DeepSpeed's MoE layer (gather the real tokens, pad
    # every expert to the largest load); "grouped" = sort the routes by expert and run one grouped GEMM
    # (eve_ds.models.moe_dispatch: no host syncs, no padding; no-drop, plain top-k, any ep_size).
    moe_dispatch: str = "deepspeed"

    # Pre-training heads.
    mlm_head_hidden: int | None = None  # two-layer MLP text decoder; None -> hidden_size
    decoder_depth: int = 8  # MIM pixel decoder (MAE style)
    decoder_width: int = 512
    decoder_heads: int = 16
    decoder_ffn_ratio: float = 4.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def soft_blocks(self) -> list[int]:
        """0-based indices of the soft-router blocks."""
        if self.soft_router_blocks is not None:
            return sorted(self.soft_router_blocks)
        return list(range(self.num_layers - self.num_soft_blocks, self.num_layers))

    def validate(self) -> None:
        check(
            self.image_size % self.patch_size == 0,
            "model.image_size",
            self.image_size,
            f"a multiple of model.patch_size={self.patch_size}",
        )
        check(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            self.hidden_size,
            f"divisible by model.num_heads={self.num_heads}",
        )
        check(
            self.decoder_width % self.decoder_heads == 0,
            "model.decoder_width",
            self.decoder_width,
            f"divisible by model.decoder_heads={self.decoder_heads}",
        )
        n = self.num_layers
        check(0 <= self.num_soft_blocks <= n, "model.num_soft_blocks", self.num_soft_blocks, f"in [0, {n}]")
        for b in self.soft_blocks:
            check(0 <= b < n, "model.soft_router_blocks", self.soft_router_blocks, f"entries in [0, {n - 1}]")
        self._validate_moe()
        check(self.pos_embed in ("learned", "sincos"), "model.pos_embed", self.pos_embed, "learned | sincos")
        check(
            self.attention_kernel in ATTENTION_KERNELS,
            "model.attention_kernel",
            self.attention_kernel,
            " | ".join(ATTENTION_KERNELS),
        )
        check(self.ffn_act in FFN_ACTS, "model.ffn_act", self.ffn_act, " | ".join(FFN_ACTS))
        check(
            not self.modality_bias_to_experts or self.modality_routing,
            "model.modality_bias_to_experts",
            self.modality_bias_to_experts,
            "false unless model.modality_routing is true (b_m exists only with modality routing)",
        )
        check(
            0.0 <= self.text_embed_dropout < 1.0,
            "model.text_embed_dropout",
            self.text_embed_dropout,
            "in [0, 1)",
        )
        check(self.max_text_len >= 3, "model.max_text_len", self.max_text_len, ">= 3 ([CLS] x [SEP])")
        check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "in [0, 1)")

    def _validate_moe(self) -> None:
        """The soft-router blocks: experts, routing, expert parallelism, dispatch."""
        check(self.num_experts >= 1, "model.num_experts", self.num_experts, ">= 1")
        check(self.top_k in (1, 2), "model.top_k", self.top_k, "1 or 2 (what DeepSpeed's MoE supports)")
        check(self.top_k <= self.num_experts, "model.top_k", self.top_k, f"<= num_experts={self.num_experts}")
        check(
            self.ep_size >= 1 and self.num_experts % self.ep_size == 0,
            "model.ep_size",
            self.ep_size,
            f"a divisor of model.num_experts={self.num_experts}",
        )
        check(
            self.expert_impl in ("stacked", "loop"), "model.expert_impl", self.expert_impl, "stacked | loop"
        )
        check(
            self.moe_dispatch in ("deepspeed", "grouped"),
            "model.moe_dispatch",
            self.moe_dispatch,
            "deepspeed | grouped",
        )
        if self.moe_dispatch == "grouped":
            grouped = "model.moe_dispatch=grouped"
            check(not self.drop_tokens, "model.drop_tokens", self.drop_tokens, f"false with {grouped}")
            check(
                not self.top2_second_expert_sampling,
                "model.top2_second_expert_sampling",
                self.top2_second_expert_sampling,
                f"false with {grouped}",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EVEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def eve_tiny(**overrides) -> EVEConfig:
    """A CPU-sized EVE: 4 blocks of width 128, 4 experts on the top block, 64 px images."""
    base = dict(
        image_size=64,
        patch_size=16,
        num_layers=4,
        hidden_size=128,
        num_heads=4,
        ffn_size=512,
        num_soft_blocks=1,
        num_experts=4,
        drop_path_rate=0.0,
        layer_scale_init=None,
        decoder_depth=2,
        decoder_width=128,
        decoder_heads=4,
    )
    return EVEConfig(**{**base, **overrides})


def eve_base(**overrides) -> EVEConfig:
    """EVE-Base: 12 blocks, width 768, soft router (32 experts, top-2) on the top 2 blocks."""
    return EVEConfig(**overrides)


def eve_large(**overrides) -> EVEConfig:
    """EVE-Large: 24 blocks, width 1024, soft router on the top 3 blocks."""
    base = dict(
        num_layers=24,
        hidden_size=1024,
        num_heads=16,
        ffn_size=4096,
        num_soft_blocks=3,
        layer_scale_init=1e-5,
        drop_path_rate=0.1,
    )
    return EVEConfig(**{**base, **overrides})


FLAVORS = {"eve_tiny": eve_tiny, "eve_base": eve_base, "eve_large": eve_large}


def get_config(name: str, **overrides) -> EVEConfig:
    if name not in FLAVORS:
        raise ConfigError(f"model.flavor={name!r} is invalid: expected one of {sorted(FLAVORS)}")
    return FLAVORS[name](**overrides)
