"""The resolved architecture of a model flavor and its parameter counts, from a model built on the meta
device (no memory, no initialisation cost); `eve-info` prints them.

Parameter counts (global, i.e. all experts of all expert-parallel ranks):

- `params_total`: everything a pre-training run trains — the encoder plus the heads of the objectives.
- `params_encoder`: the shared Transformer (embeddings, blocks, final norm); what a fine-tuned model keeps.
- `params_embeddings`: patch projection, image [CLS], word, position and type embeddings (and the image
  mask token when an objective adds one) plus the per-block relative position bias tables.
- `params_experts`: the expert FFNs of the soft-router blocks (`params_experts_per_rank` = / ep_size).
- `params_heads`: the heads and decoders of the objectives (MLM text head, MAE pixel decoder), also per
  objective in `params_heads_by_objective`.
- `params_active_per_token`: the encoder parameters one token's activations are multiplied by, embeddings
  excluded: in every block the attention (qkv, q/v biases, projection), its pre-norm and the layer-scale
  vectors; in a hard-router block the pre-norm and FFN of the token's own modality (image and text FFNs have
  the same size); in a soft-router block the pre-norm, the router (W and the modality biases b_m) and
  `top_k` of the `num_experts` experts; plus the final norm. Embeddings and heads are not included
  (reported apart above), so `params_active_per_token + params_embeddings` bounds what any token touches.
"""

from __future__ import annotations

import dataclasses

import torch

from eve_ds.models.config import EVEConfig, get_config
from eve_ds.objectives import ObjectiveConfig, PretrainingModel


def _numel(module_or_params) -> int:
    params = module_or_params.parameters() if hasattr(module_or_params, "parameters") else module_or_params
    return sum(p.numel() for p in params)


def count_parameters(model) -> dict:
    """Parameter counts of a `PretrainingModel` built with ep_size=1 (see the module docstring)."""
    enc, cfg = model.encoder, model.model_cfg
    embed_params = [
        enc.cls_token,
        enc.pos_embed,
        enc.text_pos_embed,
        *enc.patch_embed.parameters(),
        *enc.word_embed.parameters(),
        *enc.type_embed.parameters(),
    ]
    if getattr(enc, "mask_token", None) is not None:
        embed_params.append(enc.mask_token)
    for norm in (enc.text_embed_norm, enc.embed_norm):  # model.text_embed_norm / embed_norm
        if norm is not None:
            embed_params.extend(norm.parameters())
    embeddings = _numel(embed_params)
    experts = active = 0
    for block in enc.blocks:
        shared = _numel(block.norm1) + _numel(p for p in (block.gamma_1, block.gamma_2) if p is not None)
        attn = _numel(p for n, p in block.attn.named_parameters() if not n.startswith("rel_pos."))
        if block.attn.rel_pos is not None:
            embeddings += _numel(block.attn.rel_pos)
        active += shared + attn
        if block.soft:
            moe = block.ffn.moe
            per_expert = [_numel(e) for e in moe.local_experts]
            experts += sum(per_expert)
            active += _numel(block.ffn.norm) + _numel(moe.gate) + cfg.top_k * max(per_expert)
        else:
            ffn = block.ffn
            active += max(
                _numel(ffn.norm_image) + _numel(ffn.ffn_image), _numel(ffn.norm_text) + _numel(ffn.ffn_text)
            )
    active += _numel(enc.norm)
    heads = {name: _numel(obj) for name, obj in model.objectives.items()}
    return {
        "params_total": _numel(model),
        "params_encoder": _numel(enc),
        "params_embeddings": embeddings,
        "params_experts": experts,
        "params_active_per_token": active,
        "params_heads": sum(heads.values()),
        "params_heads_by_objective": heads,
    }


def describe(name: str, overrides: dict | None = None) -> dict:
    """Resolved architecture and parameter counts of flavor `name` (with config overrides)."""
    names = {f.name for f in dataclasses.fields(EVEConfig)}
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        raise ValueError(f"model config: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    cfg = get_config(name, **(overrides or {}))
    # Counted with every expert in this process (ep_size=1); the totals do not depend on ep_size.
    with torch.device("meta"):
        model = PretrainingModel(dataclasses.replace(cfg, ep_size=1), ObjectiveConfig())
    soft = cfg.soft_blocks
    info = {
        "name": name,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "ffn_size": cfg.ffn_size,
        "hard_router_blocks": [i for i in range(cfg.num_layers) if i not in soft],
        "soft_router_blocks": soft,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "ep_size": cfg.ep_size,
        "experts_per_rank": cfg.num_experts // cfg.ep_size,
        "drop_tokens": cfg.drop_tokens,
        "modality_routing": cfg.modality_routing,
        "modality_bias_to_experts": cfg.modality_bias_to_experts,
        "ffn_act": cfg.ffn_act,
        "text_embed_norm": cfg.text_embed_norm,
        "embed_norm": cfg.embed_norm,
        "pos_resample_antialias": cfg.pos_resample_antialias,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_patches": cfg.num_patches,
        "max_text_len": cfg.max_text_len,
        "vocab_size": cfg.vocab_size,
        "decoder_depth": cfg.decoder_depth,
        "decoder_width": cfg.decoder_width,
        "decoder_heads": cfg.decoder_heads,
    }
    info.update(count_parameters(model))
    info["params_experts_per_rank"] = info["params_experts"] // cfg.ep_size
    return info
