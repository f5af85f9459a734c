"""Analytic matmul FLOPs of one pre-training step per image-text pair, for every objective.

A matmul (m x k) @ (k x n) counts 2·m·k·n. Per encoder pass over N tokens (n_img image tokens incl. [CLS],
L text positions incl. padding, r real text tokens):
  patch embedding   2·P·(p²C)·D                       (all P patches, also when MIM keeps only some)
  per block         8·N·D² (qkv + out projection) + 4·N²·D (scores + weighted sum)
  hard-router FFN   4·N·D·F                           (one FFN per token, padding included: it is computed)
  soft-router FFN   2·T·D·E (router) + k·4·T·D·F      (T = n_img + r real tokens, top-k experts each)
Heads: MLM 2·m·(D·H + H·V) on the m masked tokens; pixel decoder on P + 1 tokens of width w (embedding,
ViT blocks 8·M·w² + 4·M²·w + 4·r_d·M·w², prediction); token-MIM head 2·n·D·V_tok on the n masked patches;
ITC projections and similarities; ITM classifier. Training = 3 x forward (backward ≈ 2 x forward); the
frozen visual tokenizer runs forward only (1 x). Elementwise ops, norms, softmax and routing are not
counted (the usual MFU convention).
"""

from __future__ import annotations

from dataclasses import dataclass

from eve_ds.models.config import EVEConfig
from eve_ds.objectives.base import ObjectiveConfig

FORMULA = (
    "FLOPs/pair = 3 x forward matmul FLOPs (+1 x the frozen tokenizer), forward per encoder pass = "
    "2·P·p²C·D + Σ_blocks [8·N·D² + 4·N²·D + FFN], FFN = 4·N·D·F (hard) or 2·T·D·E + k·4·T·D·F (soft, T real "
    "tokens) + heads; MFU = pairs/s x FLOPs/pair / peak dense bf16 FLOP/s of one GPU"
)


@dataclass
class TextShape:
    """L: padded text length (positions computed); real: real tokens per caption ([CLS] ... [SEP])."""

    padded: int
    real: int


def encoder_pass_flops(cfg: EVEConfig, n_image: int, text: TextShape | None, patch_embed: bool) -> float:
    """Forward matmul FLOPs of one encoder pass for one sample. n_image: image tokens incl. [CLS] (0 =
    text-only); text: None for an image-only pass; patch_embed: the image goes through the patch embedding."""
    D, F = cfg.hidden_size, cfg.ffn_size
    L = text.padded if text else 0
    real = n_image + (text.real if text else 0)
    N = n_image + L
    flops = 2.0 * cfg.num_patches * cfg.patch_size**2 * cfg.in_chans * D if patch_embed else 0.0
    soft = set(cfg.soft_blocks)
    for i in range(cfg.num_layers):
        flops += 8.0 * N * D * D + 4.0 * N * N * D
        if i in soft:
            flops += 2.0 * real * D * cfg.num_experts + cfg.top_k * 4.0 * real * D * F
        else:
            flops += 4.0 * N * D * F
    return flops


def mlm_masked_tokens(real: int, ratio: float) -> int:
    """Tokens MLM masks in a caption of `real` tokens (masking.mask_text: round(ratio·n), n = real - 2)."""
    n = max(0, real - 2)
    return min(n, max(1, round(n * ratio)))


def pixel_decoder_flops(cfg: EVEConfig, n_visible: int) -> float:
    w, M = cfg.decoder_width, cfg.num_patches + 1
    flops = 2.0 * (1 + n_visible) * cfg.hidden_size * w
    flops += cfg.decoder_depth * (8.0 * M * w * w + 4.0 * M * M * w + 4.0 * cfg.decoder_ffn_ratio * M * w * w)
    return flops + 2.0 * M * w * cfg.patch_size**2 * cfg.in_chans


def objective_flops(
    name: str, cfg: EVEConfig, obj: ObjectiveConfig, text: TextShape, batch: int, tokenizer_code_dim: int = 32
) -> tuple[float, float]:
    """-> (trainable forward FLOPs, frozen forward-only FLOPs) per pair for one objective.
    batch: the micro-batch (ITC's similarity matrix is batch x batch on one device)."""
    P, D = cfg.num_patches, cfg.hidden_size
    full = encoder_pass_flops(cfg, P + 1, text, patch_embed=True)
    if name == "mlm":
        m = mlm_masked_tokens(text.real, obj.text_mask_ratio)
        H = cfg.mlm_head_hidden or D
        return full + 2.0 * m * (D * H + H * cfg.vocab_size), 0.0
    if name == "mim_pixel":
        n_keep = int(P * (1 - obj.image_mask_ratio))
        enc = encoder_pass_flops(cfg, 1 + n_keep, text, patch_embed=True)
        return enc + pixel_decoder_flops(cfg, n_keep), 0.0
    if name == "mim_token":
        n = max(1, round(obj.mim_token_mask_ratio * P))
        V, c, pix = obj.mim_token_vocab_size, tokenizer_code_dim, cfg.patch_size**2 * cfg.in_chans
        return full + 2.0 * n * D * V, 2.0 * P * pix * c + 2.0 * P * c * V
    if name == "itc":
        e = obj.itc_embed_dim
        image = encoder_pass_flops(cfg, P + 1, None, patch_embed=True)
        txt = encoder_pass_flops(cfg, 0, text, patch_embed=False)
        # two projections; image->text and text->image logits (batch x batch each)
        return image + txt + 2 * 2.0 * D * e + 2 * 2.0 * batch * e, 2.0 * batch * e
    if name == "itm":
        return 3 * (full + 2.0 * D * 2), 0.0
    raise ValueError(f"no FLOPs model for objective {name!r}")


def flops_per_pair(cfg: EVEConfig, obj: ObjectiveConfig, text: TextShape, batch: int) -> float:
    """Training FLOPs per image-text pair for the task set `obj.objectives`: 3 x trainable forward + frozen."""
    total = 0.0
    for name in obj.objectives:
        train, frozen = objective_flops(name, cfg, obj, text, batch)
        total += 3.0 * train + frozen
    return total
