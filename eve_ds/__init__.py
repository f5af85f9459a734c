"""EVE-DS: open pre-training for EVE (masked signal modeling + modality-aware MoE) on DeepSpeed."""

__version__ = "0.1.0"
