"""Reading DeepSpeed checkpoints of EVE and EVLM (ZeRO-2, native MoE), whatever ep_size they were saved with.

A tag directory written by ``engine.save_checkpoint`` holds::

    mp_rank_00_model_states.pt                       'module': every non-expert weight (and the gate)
    layer_{L}_expert_{E}_mp_rank_00_model_states.pt  one file per MoE layer L and *global* expert id E
    [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt  ZeRO-2 shard of data-parallel rank r
    eve_config.json                                  {"model", "objective", "run"} (the trainer)

Expert files name and key experts by their global id, so the model weights do not depend on ep_size; only
the optimizer shards do (see :mod:`eve_ds.convert.reshard`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from eve_ds.models.config import EVEConfig
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.utils.errors import UserError

logger = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
EXPERT_INFIX = ".deepspeed_moe.experts.deepspeed_experts."
EXPERT_KEY_RE = re.compile(r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..*)$")


class ConvertError(UserError, ValueError):
    """Input that cannot be converted; the message names the file or key that is wrong."""


def resolve_tag_dir(path: str | Path) -> Path:
    """A DeepSpeed tag dir from a tag dir, a checkpoints dir or a run dir (via its ``latest`` file)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if (path / MODEL_STATES).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            tag = root / latest.read_text().strip()
            if not (tag / MODEL_STATES).is_file():
                raise ConvertError(
                    f"{latest} names tag {tag.name!r}, but {tag / MODEL_STATES} does not exist"
                )
            return tag
    raise ConvertError(
        f"{path} is not a DeepSpeed checkpoint: no {MODEL_STATES} in it and no "
        f"checkpoints/latest (expected a run dir, a checkpoints dir or a tag dir)"
    )


def read_eve_config(tag_dir: Path) -> dict:
    """{"model", "objective", "run"?} from ``eve_config.json`` of a tag dir (or its run dir)."""
    for f in (tag_dir / "eve_config.json", tag_dir / "config.json"):
        if f.is_file():
            cfg = json.loads(f.read_text())
            if "model" not in cfg:
                raise ConvertError(f"{f}: no 'model' entry (expected the trainer's eve_config.json)")
            return cfg
    raise ConvertError(
        f"{tag_dir}: no eve_config.json (the model config the trainer writes next to the "
        f"DeepSpeed files); cannot tell which model the weights belong to"
    )


def model_config(cfg: dict, **overrides) -> EVEConfig | EVLMConfig:
    """The model config of an `eve_config.json` dict: an `EVLMConfig` for the EVLM family, else EVE's."""
    d = {k: v for k, v in cfg["model"].items() if k != "flavor"}
    cls = EVLMConfig if is_evlm(cfg) else EVEConfig
    try:
        return cls.from_dict({**d, **overrides})
    except (TypeError, ValueError) as e:
        raise ConvertError(f"model config: {e}") from e


def is_evlm(cfg: dict) -> bool:
    """A checkpoint of the EVLM family (`train/family.py` writes the family into `eve_config.json`)."""
    return cfg.get("family") == "evlm"


def torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise ConvertError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from e


def expert_files(tag_dir: Path) -> dict[tuple[int, int], Path]:
    """{(moe layer, global expert id): file}."""
    out = {}
    for f in tag_dir.iterdir():
        m = EXPERT_RE.match(f.name)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = f
    return out


def moe_prefixes(model_states: dict) -> list[str]:
    """Module names of the MoE layers in DeepSpeed's layer order (order of ``named_modules``)."""
    prefixes: list[str] = []
    for key in model_states["module"]:
        if key.endswith(".deepspeed_moe.gate.wg.weight"):
            prefixes.append(key[: -len(".deepspeed_moe.gate.wg.weight")])
    return prefixes


def consolidated_state_dict(tag_dir: Path, num_experts: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    """All weights of a DeepSpeed tag dir in the ep_size=1 layout (local expert id = global id).
    num_experts: experts per MoE layer; None: each layer's own count, as its files hold them (a model
    with MoE layers of different sizes, e.g. an EVLM-MoE on an EVE tower), ids 0..n-1 each.

    -> (state dict, the raw model-states dict without 'module')."""
    states = torch_load(tag_dir / MODEL_STATES)
    if "module" not in states:
        raise ConvertError(f"{tag_dir / MODEL_STATES}: no 'module' entry; not a DeepSpeed model-states file")
    sd = dict(states.pop("module"))
    files = expert_files(tag_dir)
    for layer, prefix in enumerate(moe_prefixes({"module": sd})):
        count = num_experts
        if count is None:
            count = 1 + max((e for (lay, e) in files if lay == layer), default=-1)
        for e in range(count):
            f = files.get((layer, e))
            if f is None:
                name = f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
                raise ConvertError(
                    f"{tag_dir}: missing expert file {name} (MoE layer {layer} = {prefix}, "
                    f"expert {e} of {count})"
                )
            for k, v in torch_load(f).items():
                m = EXPERT_KEY_RE.match(k)
                if not m or int(m.group(2)) != e or not k.startswith(prefix + "."):
                    raise ConvertError(
                        f"{f}: unexpected key {k!r} (expected {prefix}{EXPERT_INFIX[:-1]}.{e}.*)"
                    )
                sd[k] = v
    extra = sorted(f.name for (layer, e), f in files.items() if num_experts is not None and e >= num_experts)
    if extra:
        raise ConvertError(
            f"{tag_dir}: expert files {extra[:4]} beyond num_experts={num_experts} of the config"
        )
    return sd, states


def localize_experts(sd: dict[str, torch.Tensor], ep_rank: int, n_local: int) -> dict[str, torch.Tensor]:
    """ep_size=1 names (global expert ids) -> the names of one ep rank's module (local ids); the experts
    of other ranks are left out."""
    out = {}
    for k, v in sd.items():
        m = EXPERT_KEY_RE.match(k)
        if m is None:
            out[k] = v
            continue
        local = int(m.group(2)) - ep_rank * n_local
        if 0 <= local < n_local:
            out[f"{m.group(1)}{local}{m.group(3)}"] = v
    return out
