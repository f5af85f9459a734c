"""Consolidated ("native") exports: one ``model.safetensors`` with every weight in the ep_size=1 layout,
``config.json`` ({"model", "objective", "run", ...}) and the tokenizer files — loadable in one process
with any ep_size, without DeepSpeed's checkpoint machinery."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from eve_ds.convert.ds_checkpoint import (
    ConvertError,
    consolidated_state_dict,
    is_evlm,
    model_config,
    read_eve_config,
    resolve_tag_dir,
)
from eve_ds.convert.tokenizer import copy_tokenizer
from eve_ds.models.eve import EVEModel
from eve_ds.models.weights import (
    NATIVE_FORMAT,
    WEIGHTS,
    WeightsMismatchError,
    is_native_export,
    load_state_dict_strict,
    read_native_export,
)
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.utils.io import atomic_write_json, staging_dir

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights (ep_size=1 names) and config dict of a native export, a DeepSpeed tag dir or a run dir."""
    path = Path(path)
    if is_native_export(path):
        try:
            return read_native_export(path)
        except WeightsMismatchError as e:
            raise ConvertError(str(e)) from e
    tag = resolve_tag_dir(path)
    cfg = read_eve_config(tag)
    if is_evlm(cfg):
        raise ConvertError(f"{tag}: an EVLM checkpoint; export and evaluation read EVE checkpoints only")
    sd, _ = consolidated_state_dict(tag, model_config(cfg).num_experts)
    state = tag / "trainer_state.json"
    cfg = {
        **cfg,
        "source": str(tag),
        "step": json.loads(state.read_text()).get("step") if state.is_file() else None,
    }
    return sd, cfg


def read_source_config(path: str | Path) -> dict:
    """The config dict of a native export, a DeepSpeed tag dir or a run dir, without reading its weights;
    {} for a weights file (a BEiT v2 state dict has none)."""
    path = Path(path)
    if path.is_file():
        return {}
    if is_native_export(path):
        return json.loads((path / "config.json").read_text())
    return read_eve_config(resolve_tag_dir(path))


def objective_config(cfg: dict) -> ObjectiveConfig:
    try:
        obj = ObjectiveConfig.from_dict(cfg.get("objective") or {})
        obj.validate()
    except (TypeError, ValueError) as e:
        raise ConvertError(f"objective config: {e}") from e
    return obj


def load_checked(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load (`eve_ds.models.weights.load_state_dict_strict`) with a ConvertError for the CLI."""
    try:
        load_state_dict_strict(module, sd, source)
    except WeightsMismatchError as e:
        raise ConvertError(str(e)) from e


def check_weights(cfg: dict, sd: dict[str, torch.Tensor], source: str) -> None:
    """The weights of a checkpoint (ep_size=1 names) against its config. EVE: a strict load. EVLM, whose
    module file leaves out the frozen LM and ViT: against a meta-device build (no file read), every tensor
    the model's, with its shape, and every trainable tensor there."""
    if not is_evlm(cfg):
        load_checked(build_pretraining_model(cfg), sd, source)
        return
    from eve_ds.models.evlm.model import EVLMModel  # transformers: only for EVLM checkpoints

    mcfg = model_config(cfg, ep_size=1, lm_path="", vision_path="")
    mcfg.media_token_id = max(0, mcfg.media_token_id)  # no tokenizer to look it up in; any row will do
    with torch.device("meta"):
        model = PretrainingModel(mcfg, objective_config(cfg), backbone=EVLMModel(mcfg))
    own = model.state_dict()
    unknown = [k for k in sd if k not in own or tuple(sd[k].shape) != tuple(own[k].shape)]
    absent = [n for n, p in model.named_parameters() if p.requires_grad and n not in sd]
    if unknown:
        k = unknown[0]
        why = f"{tuple(sd[k].shape)}, the model's is {tuple(own[k].shape)}" if k in own else "not the model's"
        raise ConvertError(f"{source}: tensor {k!r}: {why} ({len(unknown)} such tensor(s))")
    if absent:
        raise ConvertError(f"{source}: lacks the trainable tensor {absent[0]!r} ({len(absent)} missing)")


def build_pretraining_model(cfg: dict, ep_size: int = 1) -> PretrainingModel:
    return PretrainingModel(model_config(cfg, ep_size=ep_size), objective_config(cfg))


def load_pretraining_model(path: str | Path, device: str = "cpu") -> tuple[PretrainingModel, dict]:
    """A native export dir, a DeepSpeed tag dir or a run dir -> (PretrainingModel with ep_size=1 in eval
    mode, config dict {"model", "objective", "run"?, ...}); experts are gathered from their files."""
    sd, cfg = read_source(path)
    model = build_pretraining_model(cfg)
    load_checked(model, sd, str(path))
    cfg = {**cfg, "model": {**cfg["model"], "ep_size": 1}}
    return model.to(device).eval(), cfg


def load_encoder(path: str | Path, device: str = "cpu") -> EVEModel:
    """Only the encoder (no objective heads) of a native export / DeepSpeed checkpoint, ep_size=1, eval."""
    return read_encoder(path, device)[0]


def read_encoder(path: str | Path, device: str = "cpu") -> tuple[EVEModel, dict]:
    """`load_encoder` and the source's config dict (with `source`: the tag read, `step`, for a checkpoint)."""
    sd, cfg = read_source(path)
    enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    model = EVEModel(model_config(cfg, ep_size=1), image_mask_token="mask_token" in enc)
    load_checked(model, enc, str(path))
    return model.to(device).eval(), cfg


def write_native(dst: Path, state_dict: dict[str, torch.Tensor], cfg: dict, dtype: str) -> None:
    """Write model.safetensors + config.json + tokenizer into the (staging) directory `dst`."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    sd = {
        k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in state_dict.items()
    }
    save_file(sd, dst / WEIGHTS, metadata={"format": "pt"})
    tokenizer = copy_tokenizer(cfg, dst)
    # "weights_dtype", not "dtype": transformers reads config.json of a folder (AutoTokenizer does, to find
    # the model type) and takes a "dtype" string as the name of a torch dtype. Older exports' "dtype" is
    # dropped here and never read otherwise.
    meta = {k: v for k, v in cfg.items() if k not in ("format", "dtype", "weights_dtype", "tokenizer_files")}
    atomic_write_json(
        dst / "config.json",
        {**meta, "format": NATIVE_FORMAT, "weights_dtype": dtype, "tokenizer_files": tokenizer},
    )


def export(
    src: str | Path,
    dst: str | Path,
    dtype: str = "fp32",
    fmt: str = "native",
    overwrite: bool = False,
    text_rule: Callable[[dict], dict | None] | None = None,
) -> Path:
    """DeepSpeed checkpoint (any ep_size) or native export -> a native or Hugging Face folder at `dst`.

    text_rule: for an HF export, a function of the checkpoint's config giving the text rule its task
    applied before tokenising (recorded as config.text_rule; `eve_ds.infer.preprocess.hf_text_rule`)."""
    if fmt not in ("native", "hf"):
        raise ConvertError(f"--format {fmt!r}: choose native or hf")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    model, cfg = load_pretraining_model(src)
    with staging_dir(dst, overwrite) as tmp:
        if fmt == "native":
            write_native(tmp, model.state_dict(), cfg, dtype)
        else:
            # transformers' modelling stack (seconds to import) only for an HF export
            from eve_ds.convert.hf_export import write_hf

            write_hf(tmp, model, cfg, dtype, text_rule(cfg) if text_rule else None)
    logger.info("exported %s -> %s (%s, %s)", src, dst, fmt, dtype)
    return Path(dst)
