"""EVLM's `vision: eve` tower from an EVE run: `model.vision_path` names what `eve-pretrain` leaves (a run
directory, whose `checkpoints/latest` tag is read), a checkpoint tag, or an `eve-convert export` folder.
Relative paths are relative to the directory the command runs in, as every path of a config.

The encoder's weights come out of the DeepSpeed checkpoint through `eve_ds.convert.load_encoder` (the
experts gathered into the ep_size=1 layout); the objective heads are left behind. A path with no EVE
run is one error that names it and the command that makes the default run.
"""

from __future__ import annotations

import os

from eve_ds.convert.ds_checkpoint import ConvertError
from eve_ds.convert.export import read_encoder
from eve_ds.models.eve import EVEModel
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.utils.config import ConfigError
from eve_ds.utils.io import tensors_sha256

MAKE_DEFAULT_RUN = "`eve-pretrain` (no arguments) trains the default EVE run into runs/eve_tiny_synthetic"


def eve_tower_problem(m: EVLMConfig) -> str | None:
    """Why `model.vision_path` cannot give an EVE tower (checked without reading weights), or None."""
    if m.vision != "eve" or not m.vision_path or "$" in m.vision_path:
        return None  # no path: a random tower; "$": reported as an unset variable
    if not os.path.exists(m.vision_path):
        return (
            f"model.vision_path={m.vision_path!r}: no EVE run there (a run directory, a checkpoint tag or an "
            f"export; relative to {os.getcwd()}); {MAKE_DEFAULT_RUN}, or point model.vision_path at another"
        )
    return None


def load_eve_tower(m: EVLMConfig) -> EVEModel | None:
    """The EVE encoder of `model.vision_path` (module doc); None when the tower is not an EVE run's."""
    problem = eve_tower_problem(m)
    if problem:
        raise ConfigError(problem)
    if m.vision != "eve" or not m.vision_path:
        return None
    try:
        encoder, cfg = read_encoder(m.vision_path)
    except ConvertError as e:
        raise ConfigError(f"model.vision_path={m.vision_path!r}: {' '.join(str(e).split())}") from e
    # Which weights these are: a run directory's `latest` moves on when the EVE run goes on, and a resume
    # must rebuild the frozen blocks it started from (`tower_change_problem`).
    encoder.source = {
        "path": os.path.abspath(m.vision_path),
        "checkpoint": cfg.get("source", os.path.abspath(m.vision_path)),
        "step": cfg.get("step"),
        "weights_sha256": tensors_sha256(encoder.state_dict()),
    }
    return encoder


def tower_source(backbone) -> dict | None:
    """The `source` record of an EVLM backbone's EVE tower (`load_eve_tower`), or None."""
    return getattr(getattr(backbone.vision, "encoder", None), "source", None)


def tower_change_problem(saved: dict | None, now: dict | None) -> str | None:
    """Why the EVE tower built now is not the one a checkpoint's run started from, or None."""
    if not saved or not now or not saved.get("weights_sha256"):
        return None
    if saved["weights_sha256"] == now["weights_sha256"]:
        return None
    return (
        f"model.vision_path={now['path']!r}: the EVE tower is not the one this run started from (then "
        f"{saved['checkpoint']}, step {saved.get('step')}; now {now['checkpoint']}, step {now.get('step')}): "
        f"its frozen blocks would change on resume; point model.vision_path at {saved['checkpoint']}"
    )
