"""Hugging Face export: config.json (with auto_map), model.safetensors, modeling_eve.py, tokenizer files.

AutoModel.from_pretrained(dir, trust_remote_code=True)  # torch + transformers only

The classes of `eve_ds.hf.modeling_eve` are registered for the auto classes, so that `save_pretrained`
writes the `auto_map` and copies the modeling file itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from eve_ds.convert.ds_checkpoint import ConvertError
from eve_ds.convert.tokenizer import copy_tokenizer
from eve_ds.hf.modeling_eve import EVEHFConfig, EVEHFModel
from eve_ds.models.eve import EVEModel
from eve_ds.models.weights import mismatch_report

RENAMES = [  # EVEModel key -> HF key
    (re.compile(r"^patch_embed\.proj\."), "patch_embed."),
    (re.compile(r"\.attn\.rel_pos\.relative_position_bias_table$"), ".attn.relative_position_bias_table"),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.gate\.wg\."), ".ffn.gate."),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.gate\.modality_bias$"), ".ffn.modality_bias"),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.experts\.deepspeed_experts\."), ".ffn.experts."),
]

EVEHFConfig.register_for_auto_class()
EVEHFModel.register_for_auto_class("AutoModel")


def hf_state_dict(encoder: EVEModel) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in encoder.state_dict().items():
        if k == "mask_token":  # MIM-only input token: not part of inference
            continue
        for pattern, repl in RENAMES:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def hf_config_kwargs(encoder: EVEModel) -> dict:
    c = encoder.cfg
    if c.drop_tokens or c.top2_second_expert_sampling:
        raise ConvertError(
            "HF export implements no-drop top-k routing without sampling; this model has "
            f"drop_tokens={c.drop_tokens}, top2_second_expert_sampling={c.top2_second_expert_sampling}"
        )
    return dict(
        image_size=c.image_size,
        patch_size=c.patch_size,
        in_chans=c.in_chans,
        vocab_size=c.vocab_size,
        max_text_len=c.max_text_len,
        pad_token_id=c.pad_token_id,
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        num_heads=c.num_heads,
        ffn_size=c.ffn_size,
        qkv_bias=c.qkv_bias,
        layer_scale=c.layer_scale_init is not None,
        rel_pos_bias=c.rel_pos_bias,
        norm_eps=c.norm_eps,
        soft_blocks=c.soft_blocks,
        num_experts=c.num_experts,
        moe_top_k=c.top_k,
        modality_routing=c.modality_routing,
        text_embed_norm=c.text_embed_norm,
        embed_norm=c.embed_norm,
        ffn_act=c.ffn_act,
        modality_bias_to_experts=c.modality_bias_to_experts,
    )


def write_hf(dst: Path, encoder: EVEModel, cfg: dict, dtype: str) -> None:
    """Write the HF folder into the (staging) directory `dst`."""
    config = EVEHFConfig(**hf_config_kwargs(encoder))
    config.eve = {k: cfg[k] for k in ("model", "objective") if k in cfg}
    hf = EVEHFModel(config)
    sd = hf_state_dict(encoder)
    sd["relative_position_index"] = hf.relative_position_index
    report = mismatch_report(hf.state_dict(), sd, "the EVE encoder")
    if report:
        raise ConvertError(f"HF key mapping incomplete: {report}")
    hf.load_state_dict(sd, strict=True)
    hf.to(torch.bfloat16 if dtype == "bf16" else torch.float32)  # floating-point tensors only
    hf.save_pretrained(dst)
    copy_tokenizer(cfg, dst)
