"""Hugging Face export: config.json (with auto_map), model.safetensors, modeling_eve.py, tokenizer files
and preprocessor_config.json (the image size and normalisation the model was trained with).

AutoModel.from_pretrained(dir, trust_remote_code=True)  # the encoder; torch + transformers only
AutoModelForVisualQuestionAnswering.from_pretrained(dir, trust_remote_code=True)  # VQA fine-tunes
AutoTokenizer.from_pretrained(dir); AutoImageProcessor.from_pretrained(dir)

The classes of `eve_ds.hf.modeling_eve` are registered for the auto classes, so that `save_pretrained`
writes the `auto_map` and copies the modeling file itself. A VQA fine-tune is saved as `EVEForVQA` (encoder
weights under `eve.`, which `AutoModel` strips as the base model prefix) with its answers as `id2label`;
the other heads (pre-training, retrieval, NLVR2) are not exported.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from eve_ds.convert.ds_checkpoint import ConvertError
from eve_ds.convert.tokenizer import copy_tokenizer
from eve_ds.hf.modeling_eve import EVEForVQA, EVEHFConfig, EVEHFModel
from eve_ds.models.eve import EVEModel
from eve_ds.models.weights import mismatch_report
from eve_ds.objectives import PretrainingModel

RENAMES = [  # EVEModel key -> HF key
    (re.compile(r"^patch_embed\.proj\."), "patch_embed."),
    (re.compile(r"\.attn\.rel_pos\.relative_position_bias_table$"), ".attn.relative_position_bias_table"),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.gate\.wg\."), ".ffn.gate."),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.gate\.modality_bias$"), ".ffn.modality_bias"),
    (re.compile(r"\.ffn\.moe\.deepspeed_moe\.experts\.deepspeed_experts\."), ".ffn.experts."),
]

EVEHFConfig.register_for_auto_class()
EVEHFModel.register_for_auto_class("AutoModel")
EVEForVQA.register_for_auto_class("AutoModelForVisualQuestionAnswering")


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


def image_processor(encoder: EVEModel, cfg: dict):
    """The evaluation's preprocessing as a transformers image processor: RGB, shorter side to S (bilinear),
    centre S x S crop, /255, normalised with data.image_mean/std of the run (ImageNet's when unset)."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers import CLIPImageProcessor

    data = (cfg.get("run") or {}).get("data") or {}
    s = encoder.cfg.image_size
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": s},
        resample=2,  # PIL.Image.BILINEAR, as `eve_ds.data.transforms.crop_resize`
        do_center_crop=True,
        crop_size={"height": s, "width": s},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(data.get("image_mean") or IMAGENET_DEFAULT_MEAN),
        image_std=list(data.get("image_std") or IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def hf_model(
    model: PretrainingModel, cfg: dict, text_rule: dict | None = None
) -> tuple[EVEHFModel | EVEForVQA, dict[str, torch.Tensor]]:
    """The HF model for the checkpoint's task (EVEForVQA for a VQA fine-tune, else the encoder) and its
    state dict in HF names."""
    config = EVEHFConfig(**hf_config_kwargs(model.encoder))
    config.eve = {k: cfg[k] for k in ("model", "objective") if k in cfg}
    config.text_rule = text_rule  # how the task cleaned texts before its tokenizer (None: as they are)
    sd = hf_state_dict(model.encoder)
    if "vqa" not in model.objectives:
        hf = EVEHFModel(config)
        return hf, {**sd, "relative_position_index": hf.relative_position_index}
    answers = ((cfg.get("task") or {}).get("answer_vocab") or {}).get("answers")  # AnswerVocab.to_json
    n = model.objectives["vqa"].head[-1].out_features
    if not isinstance(answers, list) or len(answers) != n:
        raise ConvertError(f"a VQA checkpoint needs its answer vocabulary of {n} answers (config.json task)")
    config.id2label = dict(enumerate(answers))
    config.label2id = {a: i for i, a in enumerate(answers)}
    config.head_norm_eps = model.obj_cfg.head_norm_eps
    config.auto_map = {"AutoModel": "modeling_eve.EVEHFModel"}  # save_pretrained adds the VQA class
    hf = EVEForVQA(config)
    sd = {f"eve.{k}": v for k, v in sd.items()}
    sd["eve.relative_position_index"] = hf.eve.relative_position_index
    sd.update({f"vqa_head.{k}": v for k, v in model.objectives["vqa"].head.state_dict().items()})
    return hf, sd


def write_hf(
    dst: Path, model: PretrainingModel, cfg: dict, dtype: str, text_rule: dict | None = None
) -> None:
    """Write the HF folder into the (staging) directory `dst`; `text_rule` goes into its config.json."""
    hf, sd = hf_model(model, cfg, text_rule)
    report = mismatch_report(hf.state_dict(), sd, "the EVE checkpoint")
    if report:
        raise ConvertError(f"HF key mapping incomplete: {report}")
    hf.load_state_dict(sd, strict=True)
    hf.to(torch.bfloat16 if dtype == "bf16" else torch.float32)  # floating-point tensors only
    hf.save_pretrained(dst)
    image_processor(model.encoder, cfg).save_pretrained(dst)
    copy_tokenizer(cfg, dst)
