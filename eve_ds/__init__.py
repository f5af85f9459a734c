"""EVE-DS: open pre-training for EVE (masked signal modeling + modality-aware MoE) on DeepSpeed."""

import os

__version__ = "0.1.0"

if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        # What DeepSpeed would pick anyway; without it DeepSpeed prints a warning to *stdout* on import,
        # which corrupts machine-readable output (`eve-info --json`, `eve-evaluate --json`).
        os.environ["DS_ACCELERATOR"] = "cpu"
