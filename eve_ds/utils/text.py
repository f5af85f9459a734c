"""Which text positions an MLM objective may mask: shared by the objectives (which mask them) and the data
path (which counts them on the host, so that the forward pass need not read the count from the device)."""

from __future__ import annotations

import torch
from torch import Tensor


def maskable_text_positions(text_mask: Tensor) -> Tensor:
    """(B, L) True on real tokens that may be masked: not [CLS] (position 0), not [SEP] (last real
    token), not padding."""
    real = text_mask.bool().clone()
    lengths = real.sum(1)
    real[:, 0] = False
    rows = torch.arange(real.shape[0], device=real.device)
    real[rows, (lengths - 1).clamp(min=0)] = False
    return real
