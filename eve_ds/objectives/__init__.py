"""Pre-training objectives: each a module returning a dict of losses; PretrainingModel sums them."""

from eve_ds.objectives import msm  # noqa: F401  (registers mlm, mim_pixel)
from eve_ds.objectives.base import OBJECTIVES, ObjectiveConfig, PretrainingModel, register_objective

__all__ = ["OBJECTIVES", "ObjectiveConfig", "PretrainingModel", "register_objective"]
