"""Parameter counts of an EVLM config, by arithmetic on its layout (nothing is built, no file is read).

`param_counts(cfg)` is what `eve-info <flavor> --json` prints: `total_params`, `trainable_params` per stage
and `active_params_per_token`. The arithmetic mirrors the modules: Qwen2 / Qwen3 decoder layers as in
transformers, timm's EVA block (fused qkv with q and v biases), and this package's cross-attention and MoE;
tests check each term against the built modules.
"""

from __future__ import annotations

from eve_ds.models.evlm.config import STAGES, VISION_TRAINABLE_FROM, EVLMConfig


def lm_params(layout: dict) -> int:
    """A Qwen2 / Qwen3 causal LM: embeddings (+ an untied head), decoder layers, the final RMSNorm."""
    kind = layout["model_type"]
    if kind not in ("qwen2", "qwen3"):
        raise ValueError(f"lm_layout.model_type={kind!r}: parameter counts know qwen2 | qwen3")
    h, n, v = layout["hidden_size"], layout["num_hidden_layers"], layout["vocab_size"]
    heads = layout["num_attention_heads"]
    head_dim = layout.get("head_dim") or h // heads
    q, kv = heads * head_dim, layout.get("num_key_value_heads", heads) * head_dim
    attn = h * q + 2 * h * kv + q * h
    if kind == "qwen2":  # q, k, v biases
        attn += q + 2 * kv
    else:  # Qwen3: RMSNorm on q and k per head, no biases
        attn += 2 * head_dim
    layer = attn + 3 * h * layout["intermediate_size"] + 2 * h
    head = 0 if layout.get("tie_word_embeddings", False) else v * h
    return v * h + head + n * layer + h


def vision_block_params(cfg: EVLMConfig) -> int:
    """One EVA block: fused qkv + q/v biases, projection, GELU MLP, two LayerNorms."""
    d, f = cfg.vision_width, cfg.vision_mlp
    return 3 * d * d + 2 * d + d * d + d + 2 * d * f + f + d + 4 * d


def vision_params(cfg: EVLMConfig) -> int:
    """Class token, position table at `image_size`, patch embedding and the blocks up to the last feature
    level (later blocks, the final norm and the head are pruned)."""
    d, p = cfg.vision_width, cfg.vision_patch
    tokens = 1 + (cfg.image_size // p) ** 2
    stem = d + tokens * d + d * 3 * p * p + d
    return stem + (max(cfg.feature_layers) + 1) * vision_block_params(cfg)


def ffn_params(d: int, hidden: int, kind: str) -> int:
    """SwiGLU (gate, up, down) or GELU MLP (fc1, fc2), without biases."""
    return (3 if kind == "swiglu" else 2) * d * hidden


def xattn_params(cfg: EVLMConfig) -> dict[str, int]:
    """One gated cross-attention block: {"attn", "ffn" (dense or world + experts + router), "expert"}."""
    h, c, dv = cfg.lm_hidden, cfg.xattn_dim, cfg.vision_width
    attn = h + h * c + 2 * dv * c + c * h + h + 2  # norms, q, k, v, o, ffn norm, two gates
    dense = ffn_params(h, cfg.xattn_ffn_hidden, cfg.xattn_ffn)
    if not cfg.moe:
        return {"attn": attn, "ffn": dense, "expert": 0}
    expert = ffn_params(h, cfg.xattn_ffn_hidden // cfg.moe_slices, cfg.xattn_ffn)
    routed = cfg.num_experts * expert + h * cfg.num_experts + 1  # experts, router, tanh(beta) gate
    return {"attn": attn, "ffn": dense + routed, "expert": expert}


def param_counts(cfg: EVLMConfig) -> dict:
    """{"total_params", "trainable_params": {stage: n}, "active_params_per_token", "parts": {...}}.

    trainable: cross-attention + media tokens, plus the ViT blocks from `VISION_TRAINABLE_FROM[stage]` of
    the depth; "stage1_early" is stage 1 before the ViT joins. Active per token: everything but the routed
    experts a token does not use ((E - k) per layer); the dense model's is its total.
    """
    n_layers = cfg.lm_layout["num_hidden_layers"]
    x = xattn_params(cfg)
    parts = {
        "lm": lm_params(cfg.lm_layout),
        "vision": vision_params(cfg),
        "xattn": n_layers * (x["attn"] + x["ffn"]),
        "media_tokens": cfg.num_media_tokens * cfg.lm_hidden,
        "time_embed": cfg.video_time_embed * cfg.vision_width,
    }
    total = sum(parts.values())
    fusion = parts["xattn"] + parts["media_tokens"] + parts["time_embed"]
    trainable = {"stage1_early": fusion}
    kept = max(cfg.feature_layers) + 1
    for stage in STAGES:
        first = int(VISION_TRAINABLE_FROM[stage] * cfg.vision_depth)
        trainable[stage] = fusion + max(0, kept - first) * vision_block_params(cfg)
    idle = n_layers * (cfg.num_experts - cfg.top_k) * x["expert"] if cfg.moe else 0
    return {
        "total_params": total,
        "trainable_params": trainable,
        "active_params_per_token": total - idle,
        "parts": parts,
    }


def lm_side_flops(s_img: int, s_txt: int, h: int, d_img: int, r_xc: float, r_xf: float,
                  s_q: int | None = None, ffn: str = "swiglu") -> dict[str, float]:  # fmt: skip
    """Forward FLOPs per LM layer and sample of the two ways an LM reads s_img image tokens (EVLM Sec. 2,
    eq. 1 and eq. 2 as reconstructed: the extracted eq. 2 is garbled), the ViT excluded (the same in both):

        concat = 24 s h^2 + 4 s^2 h,  s = s_img + s_txt                    (LLaVA-style, eq. 1)
        xattn  = 4 (6 + r_xc + c r_xf) s_q h^2 + 4 s_q^2 h                   (LM layer, xattn q/o, FFN)
               + 4 r_xc s_q s_img h + 4 r_xc s_img d_img h                   (xattn scores; k/v of the image)

    with c = 1.5 for a SwiGLU FFN of hidden r_xf h (3 matrices), 1 for a 2-matrix GELU one, and s_q the
    LM's own tokens (default s_txt: the paper's 0.24 / 0.077 count the 16 media tokens inside s_txt = 64).
    -> {"concat", "xattn", "ratio" = xattn / concat}."""
    s_q = s_txt if s_q is None else s_q
    c = {"swiglu": 1.5, "gelu": 1.0}[ffn]
    s = s_img + s_txt
    concat = 24 * s * h**2 + 4 * s**2 * h
    xattn = 4 * (6 + r_xc + c * r_xf) * s_q * h**2 + 4 * s_q**2 * h
    xattn += 4 * r_xc * s_q * s_img * h + 4 * r_xc * s_img * d_img * h
    return {"concat": float(concat), "xattn": float(xattn), "ratio": xattn / concat}
