"""Pre-training objectives: each a module returning a dict of losses; PretrainingModel sums them."""

from eve_ds.objectives import caption_lm, contrastive, joint, mim_token, msm, nlvr2, vqa  # noqa: F401  (register the objectives)
from eve_ds.objectives.base import OBJECTIVES, ObjectiveConfig, PretrainingModel, register_objective

__all__ = ["OBJECTIVES", "ObjectiveConfig", "PretrainingModel", "register_objective"]
