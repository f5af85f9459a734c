"""Hugging Face export: config.json (with auto_map), model.safetensors, modeling_eve.py, tokenizer files.

AutoModel.from_pretrained(dir, trust_remote_code=True)  # torch + transformers only
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from eve_ds.convert.ds_checkpoint import ConvertError
from eve_ds.convert.export import copy_tokenizer
from eve_ds.models.eve import EVEModel
from eve_ds.models.weights import mismatch_report

MODELING = Path(__file__).resolve().parent.parent / "hf" / "modeling_eve.py"
AUTO_MAP = {"AutoConfig": "modeling_eve.EVEHFConfig", "AutoModel": "modeling_eve.EVEHFModel"}
RENAMES = [  # EVEModel key -> HF key
    (re.compile(r"^patch_embed\.proj\."), "patch_embed."),
    (re.compile(r"\.attn\.rel_pos\.relative_position_bias_table$"), ".attn.relative_position_bias_table"),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.gate\.wg\."), ".ffn.gate."),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.gate\.modality_bias$"), ".ffn.modality_bias"),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.experts\.deepspeed_experts\."), ".ffn.experts."),
]


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


def load_modeling_module():
    spec = importlib.util.spec_from_file_location("eve_hf_modeling", MODELING)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def write_hf(dst: Path, encoder: EVEModel, cfg: dict, dtype: str) -> None:
    """Write the HF folder into the (staging) directory `dst`."""
    mod = load_modeling_module()
    config = mod.EVEHFConfig(**hf_config_kwargs(encoder))
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["EVEHFModel"]
    config.eve = {k: cfg[k] for k in ("model", "objective") if k in cfg}
    hf = mod.EVEHFModel(config)
    sd = hf_state_dict(encoder)
    sd["relative_position_index"] = hf.relative_position_index
    report = mismatch_report(hf.state_dict(), sd, "the EVE encoder")
    if report:
        raise ConvertError(f"HF key mapping incomplete: {report}")
    to = torch.bfloat16 if dtype == "bf16" else torch.float32
    sd = {k: (v.to(to) if v.is_floating_point() else v).detach().contiguous() for k, v in sd.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    config.dtype = "bfloat16" if dtype == "bf16" else "float32"
    config.save_pretrained(dst)
    shutil.copy2(MODELING, dst / "modeling_eve.py")
    copy_tokenizer(cfg, dst)
