"""Image normalisation shared by the data pipeline (model inputs) and the objectives (pixel targets)."""

from __future__ import annotations

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# (x / 255 - mean) / std as one multiply-add on uint8 pixel values x.
_SCALE = 1 / (255 * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1))
_SHIFT = -torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGENET_DEFAULT_STD).view(
    1, 3, 1, 1
)


def normalize_image(image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Batches carry images as uint8 (4x less to move from loader workers and to the GPU); the consumer
    normalises them where they are, after the transfer: (x / 255 - mean) / std in float32, then `dtype`.
    A floating-point image is taken as already normalised and only cast."""
    if image.is_floating_point():
        return image.to(dtype)
    x = image.float().mul_(_SCALE.to(image.device)).add_(_SHIFT.to(image.device))
    return x.to(dtype)
