"""EVLM (arXiv 2407.14177) as library code: config and flavors, towers, gated cross-attention, masks, MoE."""

from eve_ds.models.evlm.config import FLAVORS, STAGES, EVLMConfig, get_config
from eve_ds.models.evlm.counts import param_counts
from eve_ds.models.evlm.masks import layout_row, media_intervals, stack_rows
from eve_ds.models.evlm.model import EVLMModel, EVLMOutput
from eve_ds.models.evlm.xattn import GatedXAttn, Media

__all__ = [
    "FLAVORS",
    "STAGES",
    "EVLMConfig",
    "EVLMModel",
    "EVLMOutput",
    "GatedXAttn",
    "Media",
    "get_config",
    "layout_row",
    "media_intervals",
    "param_counts",
    "stack_rows",
]
