"""Loading weights trained at one image size into a model of another (224 px pre-training -> 384/480 px
fine-tuning): absolute image positions are resampled, relative position bias tables resized."""

from __future__ import annotations

import logging

import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

logger = logging.getLogger(__name__)

# Image position tables (1, 1 + G*G, D) with the [CLS] entry first: the encoder's and the pixel decoder's.
ABS_POS_KEYS = ("encoder.pos_embed", "objectives.mim_pixel.decoder.pos_embed")
REL_POS_SUFFIX = "relative_position_bias_table"  # ((2G-1)^2 + 3, H), the 3 [CLS] entries last


def _grid(num_tokens: int, prefix: int) -> int:
    g = round((num_tokens - prefix) ** 0.5)
    if g * g != num_tokens - prefix:
        raise ValueError(f"{num_tokens} tokens are not {prefix} + a square grid")
    return g


@torch.no_grad()
def adapt_resolution(
    sd: dict[str, torch.Tensor], own: dict[str, torch.Size], antialias: bool = True
) -> list[str]:
    """Resize, in `sd`, every image position table whose grid differs from the model's (`own` shapes).
    -> the keys changed. Same size: nothing is touched (a bitwise no-op). Absolute tables are resampled
    bicubically, with antialiasing (timm's default) or without it (`antialias=False`: plain
    `F.interpolate(mode="bicubic")`, as the official EVE release resizes; `model.pos_resample_antialias`)."""
    changed = []
    for key, value in list(sd.items()):
        if key not in own or tuple(value.shape) == tuple(own[key]):
            continue
        if key in ABS_POS_KEYS:
            old, new = _grid(value.shape[1], 1), _grid(own[key][1], 1)
            sd[key] = resample_abs_pos_embed(
                value.float(), [new, new], [old, old], num_prefix_tokens=1, antialias=antialias
            ).to(value.dtype)
        elif key.endswith(REL_POS_SUFFIX) and value.shape[1] == own[key][1]:
            new = (round((own[key][0] - 3) ** 0.5) + 1) // 2
            sd[key] = resize_rel_pos_bias_table(value.float(), (new, new), tuple(own[key])).to(value.dtype)
        else:
            continue
        changed.append(key)
    if changed:
        logger.info("resized %d image position tables to the model's grid: %s", len(changed), changed[:3])
    return changed
