"""EVLM configuration, the named flavors and their parameter counts, computed from the configs alone.

Defaults are `evlm_14b` (EVLM, arXiv 2407.14177): EVA2-CLIP-E-Plus as timm `eva02_enormous_patch14_clip_224`
and Qwen1.5-14B-Chat in place of Qwen-14B-Chat 1.0 (the same 40 x 5120 layout; the 1.0 checkpoint's
`qwen` model type does not load in transformers 5.x). `[paper]` marks values the paper states, `[ours]`
choices it leaves open.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from eve_ds.utils.config import ConfigError, check

# Qwen1.5-14B-Chat's `config.json` fields that fix the parameter count ([paper] Qwen-14B: 40 x 5120).
QWEN15_14B = dict(
    model_type="qwen2",
    hidden_size=5120,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
    intermediate_size=13696,
    vocab_size=152064,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)
# Which ViT blocks train in each stage, as the first trainable block / depth ([paper] Sec. 3.1: the latter
# half in stages 1-2, the latter quarter in SFT). In stage 1 the ViT joins after `phase_start` of the steps.
# stage0 [ours] (not in the paper): the LM itself trains on text alone, everything else frozen (the tiny
# demonstration's stand-in for a pre-trained LLM; `train/stages.py`).
VISION_TRAINABLE_FROM = {"stage0": 1.0, "stage1": 0.5, "stage2": 0.5, "stage3": 0.75}
STAGES = tuple(VISION_TRAINABLE_FROM)


@dataclass
class EVLMConfig:
    """A frozen causal LM reading hierarchical ViT features through gated cross-attention (+ optional MoE)."""

    # Language model: a local Hugging Face directory; `lm_layout` (HF config fields) when there is none yet
    # (parameter counts, meta-device builds, tests that pass the LM in).
    lm_path: str = ""
    lm_layout: dict = field(default_factory=lambda: dict(QWEN15_14B))
    lm_dtype: str = "bfloat16"
    # Vision tower: "timm" (a model name + a local weights file, never the hub) or "eve" (an EVEModel,
    # `eve_flavor` / a native export in `vision_path`). The layout fields describe the tower for counting
    # and are checked against the built one.
    vision: str = "timm"
    vision_name: str = "eva02_enormous_patch14_clip_224"
    vision_path: str = ""
    vision_kwargs: dict = field(default_factory=dict)  # extra timm / EVEConfig arguments
    image_size: int = 224  # [paper] 224 in stage 1, 448 in stages 2-3
    vision_patch: int = 14
    vision_width: int = 1792
    vision_depth: int = 64
    vision_mlp: int = 15360
    # [paper] 8 levels from the last 40 blocks; [ours] the last block of each group of 5.
    feature_layers: list[int] = field(default_factory=lambda: [28, 33, 38, 43, 48, 53, 58, 63])
    level_map: str = "block"  # block: level l feeds a contiguous group of LM layers | cycle: layer i % L
    # Gated cross-attention before every LM layer ([paper] r_xc, r_xf; [ours] heads, SwiGLU, gates at 0).
    r_xc: float = 0.2
    r_xf: float = 0.5
    xattn_heads: int = 8
    xattn_ffn: str = "swiglu"  # swiglu | gelu
    gate_init: float = 0.0
    ffn_on_imageless_text: bool = True  # Flamingo: yes; Mllama masks it out
    # Learnable image tokens ([paper] 16 per image; [ours] one table shared by every image).
    num_media_tokens: int = 16
    media_token: str = "<|evlm_media|>"
    media_token_id: int = -1  # -1: looked up as `media_token` in the tokenizer of lm_path
    init_std: float = 0.02
    # Video [ours, after Flamingo's learned temporal embeddings]: a learned table of this many rows, row f
    # added to the ViT features (every level) of a clip's frame f before the cross-attention reads them,
    # zero at initialisation (the model is the one without it). The text reads a clip's frames as one set
    # of keys, so without it their order reaches the text only through the media tokens in the LM. 0: off.
    video_time_embed: int = 0
    # The freeze policy the model is built with (`EVLMModel.trainable_parameters`): one of STAGES.
    stage: str = "stage1"
    # EVLM-MoE ([paper] N copies x M slices, top-k, + a world expert; [ours] tanh(beta) gate at 0).
    moe: bool = False
    moe_copies: int = 4
    moe_slices: int = 4
    top_k: int = 4
    routed_gate_init: float = 0.0
    ep_size: int = 1
    drop_tokens: bool = False
    capacity_factor: float = 1.0  # only used with drop_tokens

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_experts(self) -> int:
        return self.moe_copies * self.moe_slices

    @property
    def lm_hidden(self) -> int:
        return self.lm_layout["hidden_size"]

    @property
    def xattn_dim(self) -> int:
        return round(self.r_xc * self.lm_hidden)

    @property
    def xattn_ffn_hidden(self) -> int:
        return round(self.r_xf * self.lm_hidden)

    def validate(self) -> None:
        check(self.vision in ("timm", "eve"), "model.vision", self.vision, "timm | eve")
        check(self.stage in STAGES, "model.stage", self.stage, " | ".join(STAGES))
        check(self.level_map in ("block", "cycle"), "model.level_map", self.level_map, "block | cycle")
        check(self.xattn_ffn in ("swiglu", "gelu"), "model.xattn_ffn", self.xattn_ffn, "swiglu | gelu")
        bad = [i for i in self.feature_layers if not 0 <= i < self.vision_depth]
        check(
            bool(self.feature_layers) and not bad,
            "model.feature_layers",
            self.feature_layers,
            f"block indices in [0, {self.vision_depth - 1}] (vision_depth={self.vision_depth})",
        )
        check(
            self.xattn_dim % self.xattn_heads == 0,
            "model.xattn_heads",
            self.xattn_heads,
            f"a divisor of the cross-attention width r_xc * h = {self.xattn_dim}",
        )
        check(self.num_media_tokens >= 1, "model.num_media_tokens", self.num_media_tokens, ">= 1")
        check(self.video_time_embed >= 0, "model.video_time_embed", self.video_time_embed, ">= 0 (0: off)")
        # DeepSpeed's TopKGate sends k > 2 to `topkgating`, so any k up to the expert count works.
        e = self.num_experts
        check(1 <= self.top_k <= e, "model.top_k", self.top_k, f"in [1, num_experts={e}]")
        check(
            self.ep_size >= 1 and e % self.ep_size == 0,
            "model.ep_size",
            self.ep_size,
            f"a divisor of num_experts={e}",
        )
        check(
            self.xattn_ffn_hidden % self.moe_slices == 0,
            "model.moe_slices",
            self.moe_slices,
            f"a divisor of the FFN hidden size {self.xattn_ffn_hidden}",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EVLMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def evlm_14b(**overrides) -> EVLMConfig:
    """EVLM-Base/Chat: EVA02-E (64 x 1792) + Qwen1.5-14B (40 x 5120), 40 gated cross-attention layers."""
    return EVLMConfig(**overrides)


def evlm_14b_moe(**overrides) -> EVLMConfig:
    """EVLM-MoE: evlm_14b with the cross-attention FFN as a world expert + 16 experts, top-4."""
    return EVLMConfig(**{"moe": True, **overrides})


def evlm_tiny(**overrides) -> EVLMConfig:
    """CPU-sized: a 6 x 96 EVA-CLIP-E-style tower at 64 px (8 px patches), a 4 x 128 Qwen2, 8 media tokens."""
    base = dict(
        lm_layout=dict(
            model_type="qwen2",
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            vocab_size=64,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            use_cache=False,
        ),
        lm_dtype="float32",
        vision_kwargs=dict(num_heads=4),
        image_size=64,
        vision_patch=8,
        vision_width=96,
        vision_depth=6,
        vision_mlp=384,
        feature_layers=[3, 5],
        r_xc=0.5,
        r_xf=0.5,
        xattn_heads=4,
        num_media_tokens=8,
        moe_copies=4,
        moe_slices=4,
    )
    return EVLMConfig(**{**base, **overrides})


def evlm_tiny_moe(**overrides) -> EVLMConfig:
    """evlm_tiny with the MoE: a world expert of 64 + 16 experts of 16, top-4."""
    return evlm_tiny(**{"moe": True, **overrides})


FLAVORS = {
    "evlm_tiny": evlm_tiny,
    "evlm_tiny_moe": evlm_tiny_moe,
    "evlm_14b": evlm_14b,
    "evlm_14b_moe": evlm_14b_moe,
}


def get_config(name: str, **overrides) -> EVLMConfig:
    if name not in FLAVORS:
        raise ConfigError(f"model.flavor={name!r} is invalid: expected one of {sorted(FLAVORS)}")
    return FLAVORS[name](**overrides)
