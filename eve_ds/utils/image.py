"""Image normalisation shared by the data pipeline (model inputs) and the objectives (pixel targets)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as one multiply-add on uint8 pixel values x: (scale, shift), each (1, 3, 1, 1)."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return 1 / (255 * s), -m / s


_SCALE, _SHIFT = _affine(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def normalize_image(
    image: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Batches carry images as uint8 (4x less to move from loader workers and to the GPU); the consumer
    normalises them where they are, after the transfer: (x / 255 - mean) / std in float32, then `dtype`.
    `mean`, `std`: per channel (`data.image_mean` / `image_std`), None = ImageNet's. A floating-point image
    is taken as already normalised and only cast."""
    if image.is_floating_point():
        return image.to(dtype)
    scale, shift = (
        (_SCALE, _SHIFT)
        if mean is None and std is None
        else _affine(
            IMAGENET_DEFAULT_MEAN if mean is None else mean, IMAGENET_DEFAULT_STD if std is None else std
        )
    )
    x = image.float().mul_(scale.to(image.device)).add_(shift.to(image.device))
    return x.to(dtype)
