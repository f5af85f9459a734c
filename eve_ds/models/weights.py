"""Weights in and out of the library without DeepSpeed: strict loading that names what does not fit, and
the native export format (``model.safetensors`` in the ep_size=1 layout + ``config.json``).

DeepSpeed checkpoints and run directories are read by :mod:`eve_ds.convert`, which builds on this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

NATIVE_FORMAT = "eve-native"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class WeightsMismatchError(ValueError):
    """A state dict that does not fit a model; the message names the keys."""


def mismatch_report(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str) -> str:
    """'' when `sd` has exactly the keys and shapes of `own`, else one line naming the first few missing,
    unexpected and mis-shaped keys."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: {tuple(sd[k].shape)} in {source}, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    parts = [
        f"{len(missing)} missing {missing[:5]}" if missing else "",
        f"{len(unexpected)} unexpected {unexpected[:5]}" if unexpected else "",
        f"{len(shapes)} with another shape {shapes[:5]}" if shapes else "",
    ]
    return "; ".join(p for p in parts if p)


def load_state_dict_strict(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(sd, strict=True)`, failing with a message that names every kind of misfit."""
    report = mismatch_report(module.state_dict(), sd, source)
    if report:
        raise WeightsMismatchError(f"weights of {source} do not match the model config: {report}")
    module.load_state_dict(sd, strict=True)


def is_native_export(path: str | Path) -> bool:
    path = Path(path)
    f = path / CONFIG
    if not (f.is_file() and (path / WEIGHTS).is_file()):
        return False
    try:
        return json.loads(f.read_text()).get("format") == NATIVE_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_native_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with ep_size=1 names, config dict {"model", "objective", ...}) of a native export."""
    path = Path(path)
    if not is_native_export(path):
        raise FileNotFoundError(
            f"{path} is not a native EVE export (expected {CONFIG} with format {NATIVE_FORMAT!r} and "
            f"{WEIGHTS}); DeepSpeed checkpoints and run directories are read by eve_ds.convert"
        )
    try:
        sd = load_file(path / WEIGHTS)
    except Exception as e:
        raise WeightsMismatchError(f"{path / WEIGHTS}: cannot be read as safetensors ({e})") from e
    return sd, json.loads((path / CONFIG).read_text())
