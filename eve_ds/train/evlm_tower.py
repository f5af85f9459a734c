"""EVLM's `vision: eve` tower from an EVE run: `model.vision_path` names what `eve-pretrain` leaves (a run
directory, whose `checkpoints/latest` tag is read), a checkpoint tag, or an `eve-convert export` folder.
Relative paths are relative to the directory the command runs in, as every path of a config.

The encoder's weights come out of the DeepSpeed checkpoint through `eve_ds.convert.load_encoder` (the
experts gathered into the ep_size=1 layout); the objective heads are left behind. A path with no EVE
run is one error that names it and the command that makes the default run.
"""

from __future__ import annotations

import os

from eve_ds.convert import load_encoder
from eve_ds.convert.ds_checkpoint import ConvertError
from eve_ds.models.eve import EVEModel
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.utils.config import ConfigError

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
        return load_encoder(m.vision_path)
    except ConvertError as e:
        raise ConfigError(f"model.vision_path={m.vision_path!r}: {' '.join(str(e).split())}") from e
