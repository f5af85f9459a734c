"""Initial weights: BEiT v2 (timm format) -> EVE, and `load_init_weights` for the trainer's `init_from`.

BEiT v2 gives every image-side weight of a block; EVE's FFNs are filled from BEiT's one FFN (both modality
FFNs of a hard-router block, every expert of a soft-router block — the MoE output is a convex combination
of expert outputs, so identical experts reproduce the FFN exactly). timm's BEiT v2 has no absolute
position embedding, so EVE's `pos_embed` and image type embedding are set to zero; text embeddings, the
routers and the pre-training heads stay freshly initialised (or come from a BERT checkpoint, `bert=`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from eve_ds.convert.ds_checkpoint import ConvertError, localize_experts
from eve_ds.convert.export import is_native_export, read_source
from eve_ds.convert.resolution import adapt_resolution
from eve_ds.models.config import EVEConfig
from eve_ds.utils.ranks import expert_parallel_rank, rank_and_world

logger = logging.getLogger(__name__)

BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved by torch.save or safetensors, possibly wrapped in {"model"|"state_dict"|"module"}."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: not a file (expected a BEiT v2 state dict: .pth/.pt/.bin/.safetensors)")
    try:
        sd = (
            load_file(path)
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=False)
        )
    except Exception as e:
        raise ConvertError(f"{path}: cannot be read as a torch or safetensors state dict ({e})") from e
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ConvertError(f"{path}: not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _ffn_targets(cfg: EVEConfig, i: int) -> dict[str, list[str]]:
    """BEiT block-i FFN key suffix -> EVE encoder keys (ep_size=1 expert names)."""
    b = f"encoder.blocks.{i}.ffn"
    if i in cfg.soft_blocks:
        experts = [f"{b}.moe.deepspeed_moe.experts.deepspeed_experts.{e}" for e in range(cfg.num_experts)]
        out = {"norm2": [f"{b}.norm"]}
        out.update({f"mlp.{fc}": [f"{x}.{fc}" for x in experts] for fc in ("fc1", "fc2")})
        return out
    return {
        "norm2": [f"{b}.norm_image", f"{b}.norm_text"],
        **{f"mlp.{fc}": [f"{b}.ffn_image.{fc}", f"{b}.ffn_text.{fc}"] for fc in ("fc1", "fc2")},
    }


def _map_block_key(cfg: EVEConfig, i: int, rest: str) -> list[str]:
    for src, dsts in _ffn_targets(cfg, i).items():
        if rest.startswith(src + "."):
            return [f"{d}{rest[len(src) :]}" for d in dsts]
    rest = rest.replace("attn.relative_position_bias_table", "attn.rel_pos.relative_position_bias_table")
    return [f"encoder.blocks.{i}.{rest}"]


def beitv2_to_eve(sd: dict[str, torch.Tensor], cfg: EVEConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm BEiT v2 state dict -> (EVE encoder weights, "encoder."-prefixed, ep_size=1 names; ignored keys)."""
    out: dict[str, torch.Tensor] = {}
    ignored = []
    shared = sd.get("rel_pos_bias.relative_position_bias_table")  # BEiT's shared-table variant
    depth = 1 + max((int(m.group(1)) for k in sd if (m := BLOCK_RE.match(k))), default=-1)
    if depth != cfg.num_layers:
        raise ConvertError(
            f"BEiT checkpoint has {depth} blocks, the EVE config {cfg.num_layers} (num_layers)"
        )
    for k, v in sd.items():
        m = BLOCK_RE.match(k)
        if m:
            if m.group(2) == "attn.relative_position_index" or m.group(2) == "attn.k_bias":
                continue  # buffers: EVE builds the same index itself (verified in the tests)
            for dst in _map_block_key(cfg, int(m.group(1)), m.group(2)):
                out[dst] = v
        elif k in ("cls_token", "pos_embed") or k.startswith("patch_embed."):
            out[f"encoder.{k}"] = v
        elif k.startswith("fc_norm."):
            out[f"encoder.norm.{k[len('fc_norm.') :]}"] = v
        elif k.startswith("rel_pos_bias."):
            continue
        else:
            ignored.append(k)
    if shared is not None:
        for i in range(cfg.num_layers):
            out[f"encoder.blocks.{i}.attn.rel_pos.relative_position_bias_table"] = shared
    if "fc_norm.weight" not in sd and "norm.weight" in sd:  # a BEiT without mean pooling: final norm = norm
        out["encoder.norm.weight"], out["encoder.norm.bias"] = sd["norm.weight"], sd["norm.bias"]
        ignored = [k for k in ignored if not k.startswith("norm.")]
    return out, ignored


def bert_to_eve(sd: dict[str, torch.Tensor], cfg: EVEConfig) -> dict[str, torch.Tensor]:
    """HF BertModel / BertForMaskedLM state dict -> EVE word + text position embeddings."""
    for prefix in ("", "bert.", "model."):
        w = sd.get(f"{prefix}embeddings.word_embeddings.weight")
        if w is not None:
            pos = sd[f"{prefix}embeddings.position_embeddings.weight"]
            if pos.shape[0] < cfg.max_text_len:
                raise ConvertError(f"BERT has {pos.shape[0]} positions < max_text_len={cfg.max_text_len}")
            return {"encoder.word_embed.weight": w, "encoder.text_pos_embed": pos[None, : cfg.max_text_len]}
    raise ConvertError(
        "BERT checkpoint: no embeddings.word_embeddings.weight (with or without a bert. prefix)"
    )


def source_weights(path: str | Path, cfg: EVEConfig, bert: str | Path | None = None) -> tuple[dict, dict]:
    """Weights for `cfg` (ep_size=1 names) from a native export / DeepSpeed checkpoint or a BEiT v2 file
    -> (state dict, report skeleton)."""
    path = Path(path)
    if path.is_dir():
        if not is_native_export(path) and not any(path.glob("**/mp_rank_00_model_states.pt")):
            raise ConvertError(
                f"{path}: a directory but neither a native EVE export (config.json + "
                f"model.safetensors) nor a DeepSpeed checkpoint"
            )
        sd, src_cfg = read_source(path)
        report = {"source": "eve", "path": str(path), "ignored": [], "model": src_cfg.get("model") or {}}
    else:
        sd, ignored = beitv2_to_eve(read_state_dict(path), cfg)
        if "encoder.pos_embed" not in sd:  # timm BEiT v2: relative positions only
            sd["encoder.pos_embed"] = torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size)
        report = {"source": "beitv2", "path": str(path), "ignored": ignored}
    if bert is not None:
        sd.update(bert_to_eve(read_state_dict(bert), cfg))
        report["bert"] = str(bert)
    return sd, report


# Options that change what the same weights compute: an init checkpoint and the run must agree on them.
FUNCTION_OPTIONS = ("text_embed_norm", "embed_norm", "ffn_act", "modality_bias_to_experts")


def option_problems(cfg: EVEConfig, source_model: dict) -> list[str]:
    """The FUNCTION_OPTIONS whose value in the source's model config differs from the run's (a source
    saved before an option existed had its default)."""
    default = EVEConfig().to_dict()
    return [
        f"model.{k}={getattr(cfg, k)!r} but the checkpoint was saved with {source_model.get(k, default[k])!r}"
        for k in FUNCTION_OPTIONS
        if source_model.get(k, default[k]) != getattr(cfg, k)
    ]


def init_weight_problems(
    sd: dict[str, torch.Tensor], own: dict[str, torch.Size], source: str
) -> tuple[list[str], list[str]]:
    """(problems, keys unknown to the model) of initial weights `sd` (EVE names, this rank's experts) for
    a model whose parameter shapes are `own`. Every shape must match; an EVE source must hold every
    encoder weight; a BEiT v2 source may hold nothing the model does not know."""
    unknown = sorted(k for k in sd if k not in own)
    shapes = [
        f"{k}: {tuple(sd[k].shape)} in the checkpoint vs {tuple(own[k])} in the model"
        for k in sd
        if k in own and tuple(sd[k].shape) != tuple(own[k])
    ]
    missing_enc = [k for k in own if k.startswith("encoder.") and k not in sd] if source == "eve" else []
    problems = [
        f"first mismatched shape {shapes[0]} ({len(shapes)} in all)" if shapes else "",
        f"missing encoder keys {missing_enc[:5]}" if missing_enc else "",
        f"keys unknown to the model {unknown[:5]}" if unknown and source == "beitv2" else "",
    ]
    return [p for p in problems if p], unknown


@torch.no_grad()
def load_init_weights(
    model, path: str | Path, ep_rank: int | None = None, bert: str | Path | None = None
) -> dict:
    """Load initial weights into a PretrainingModel in place (before `deepspeed.initialize`).

    `path`: a native EVE export dir (or DeepSpeed checkpoint) — every encoder weight, heads where present —
    or a BEiT v2 state dict file (see the module docstring). Experts are taken for this process's ep rank
    (`ep_rank`, default from DeepSpeed's groups when distributed, else 0).
    -> report {"source", "path", "loaded": n, "fresh": [keys left as initialised], "ignored": [source keys]}.
    """
    cfg = model.model_cfg
    ep_rank = expert_parallel_rank(rank_and_world()[0], cfg.ep_size) if ep_rank is None else ep_rank
    sd, report = source_weights(path, cfg, bert)
    sd = localize_experts(sd, ep_rank, cfg.num_experts // cfg.ep_size)
    own = model.state_dict()
    if report["source"] == "beitv2":  # the image type embedding must add nothing, as in BEiT
        sd["encoder.type_embed.weight"] = torch.cat(
            [torch.zeros_like(own["encoder.type_embed.weight"][:1]), own["encoder.type_embed.weight"][1:]]
        )
    shapes = {k: v.shape for k, v in own.items()}
    adapt_resolution(sd, shapes, antialias=cfg.pos_resample_antialias)
    problems, unknown = init_weight_problems(sd, shapes, report["source"])
    problems += option_problems(cfg, report.pop("model", {}))
    if problems:
        raise ConvertError(f"{path} does not fit the model config: " + "; ".join(problems))
    sd = {k: v for k, v in sd.items() if k in own}
    model.load_state_dict(sd, strict=False)
    report.update(
        loaded=len(sd),
        ep_rank=ep_rank,
        fresh=sorted(k for k in own if k not in sd),
        ignored=report["ignored"] + unknown,
    )
    logger.info(
        "init weights from %s (%s): %d tensors loaded, %d fresh, %d ignored",
        path,
        report["source"],
        len(sd),
        len(report["fresh"]),
        len(report["ignored"]),
    )
    return report


def import_beitv2(
    src: str | Path,
    dst: str | Path,
    model: str = "eve_base",
    bert: str | Path | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    **overrides,
) -> Path:
    """BEiT v2 state dict -> native export dir of a PretrainingModel (flavor `model`, ep_size=1, MSM heads
    freshly initialised with seed 0)."""
    from eve_ds.convert.export import write_native
    from eve_ds.models.config import get_config
    from eve_ds.objectives import ObjectiveConfig, PretrainingModel
    from eve_ds.utils.io import staging_dir

    try:
        cfg = get_config(model, **{**overrides, "ep_size": 1})
    except ValueError as e:
        raise ConvertError(str(e)) from e
    torch.manual_seed(0)
    obj = ObjectiveConfig()
    pm = PretrainingModel(cfg, obj)
    report = load_init_weights(pm, src, ep_rank=0, bert=bert)
    meta = {
        "model": cfg.to_dict(),
        "objective": vars(obj),
        "init": {k: v for k, v in report.items() if k != "fresh"},
        "flavor": model,
    }
    with staging_dir(dst, overwrite) as tmp:
        write_native(tmp, pm.state_dict(), meta, dtype)
    return Path(dst)
