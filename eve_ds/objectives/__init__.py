"""Pre-training objectives: each a module returning a dict of losses; PretrainingModel sums them."""

from eve_ds.objectives import contrastive, mim_token, msm  # noqa: F401  (register itc, itm, mim_token, mlm, mim_pixel)
from eve_ds.objectives.base import OBJECTIVES, ObjectiveConfig, PretrainingModel, register_objective

__all__ = ["OBJECTIVES", "ObjectiveConfig", "PretrainingModel", "register_objective"]
