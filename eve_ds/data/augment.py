"""The released EVE fine-tuning code's RandAugment: `RandomAugment(2, 7)` of ALBEF / BLIP / X-VLM, restricted
to geometric and tone operations.

It differs from torchvision's `RandAugment(2, 7)` in ways that matter for VQA: no Color, Contrast,
Posterize, Solarize or Invert (an answer to "what colour is …" survives every operation here), each of the
two drawn operations is applied only with probability 0.5, and the magnitudes follow ALBEF's level-to-value
tables (shear 0.21, translation 7 pixels, rotation 21°, brightness and sharpness x1.36 at M = 7). The
operations are PIL's; the drawing comes from a `random.Random` passed in, so an image's augmentation is a
function of its seed (exact resume).
"""

from __future__ import annotations

import random

from PIL import Image, ImageEnhance, ImageOps

# [official code] the operations of the downstream RandomAugment; drawn with replacement.
OFFICIAL_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10  # [official code] magnitudes are levels out of 10
APPLY_PROB = 0.5  # [official code] each drawn operation is applied with this probability
FILL = (128, 128, 128)  # [official code] what affine operations move into the image


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=FILL)


def apply_op(img: Image.Image, name: str, level: float, rng: random.Random) -> Image.Image:
    """`img` after operation `name` at `level` (0..MAX_LEVEL); the sign of shears, shifts and rotations is
    drawn from `rng`. Values as ALBEF's level tables: shear 0.3 * level / 10, shift 10 px * level / 10,
    rotation 30° * level / 10, enhancement factor 1.8 * level / 10 + 0.1."""
    frac = level / MAX_LEVEL
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name in ("Brightness", "Sharpness"):
        enhancer = ImageEnhance.Brightness if name == "Brightness" else ImageEnhance.Sharpness
        return enhancer(img).enhance(1.8 * frac + 0.1)
    if name == "ShearX":
        return _affine(img, (1, _signed(0.3 * frac, rng), 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, _signed(0.3 * frac, rng), 1, 0))
    if name == "TranslateX":
        return _affine(img, (1, 0, _signed(10.0 * frac, rng), 0, 1, 0))
    if name == "TranslateY":
        return _affine(img, (1, 0, 0, 0, 1, _signed(10.0 * frac, rng)))
    if name == "Rotate":
        return img.rotate(_signed(30.0 * frac, rng), resample=Image.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown augmentation operation {name!r}; expected one of {list(OFFICIAL_OPS)}")


def official_rand_augment(
    img: Image.Image, rng: random.Random, num_ops: int = 2, magnitude: int = 7
) -> Image.Image:
    """RandomAugment(num_ops, magnitude) [official code]: `num_ops` operations drawn from OFFICIAL_OPS with
    replacement, each applied with probability APPLY_PROB. `img` is RGB."""
    for name in rng.choices(OFFICIAL_OPS, k=num_ops):
        if rng.random() < APPLY_PROB:
            img = apply_op(img, name, magnitude, rng)
    return img
