"""Per-sample decoding and augmentation, and batch collation (normalise + tokenize).

Randomness comes from a `random.Random` passed in per sample, never from a global RNG, so the
augmentation of a sample is a function of its place in the stream (which exact resume relies on).
"""

from __future__ import annotations

import io
import math
import random
import re

import numpy as np
import torch
from PIL import Image

from eve_ds.utils.image import normalize_image
from eve_ds.utils.text import maskable_text_positions

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt", "caption")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def batch_to_device(
    batch: dict,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> dict:
    """Every tensor of `batch` moved to `device`, the image normalised there (`normalize_image`) in `dtype`;
    the uint8 image stays available as `pixels` (pixel targets are computed from it in float32, not from
    the bf16-rounded image). Other values (keys, counts) are kept as they are.

    Read here from the host copy of text_mask, so that nothing in the forward pass reads a device value:
    `text_padded`, whether any text is padded; `text_real`, the number of real text tokens (the static
    size of the real-token index, `Tokens.real_index`); `text_maskable`, each caption's number of
    maskable tokens (the MLM objectives count their masked tokens from it, `masked_text_count`)."""
    mask = batch.get("text_mask")
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if not out["image"].is_floating_point():
        out["pixels"] = out["image"]
    out["image"] = normalize_image(out["image"], dtype, mean, std)
    if isinstance(mask, torch.Tensor) and mask.device.type == "cpu":
        out["text_padded"] = not bool(mask.bool().all())
        out["text_real"] = int(mask.bool().sum())
        out["text_maskable"] = maskable_text_positions(mask).sum(1).tolist()
    return out


def pad_text(batch: dict, length: int, pad_id: int) -> dict:
    """`batch` with text_ids / text_mask (B, L) padded to (B, length) by pad_id / 0: one text length for
    every batch, hence static shapes for compiled blocks (the collate pads to the batch's longest text)."""
    ids = batch.get("text_ids")
    if not isinstance(ids, torch.Tensor) or ids.shape[1] >= length:
        return batch
    extra = length - ids.shape[1]
    mask = torch.nn.functional.pad(batch["text_mask"], (0, extra), value=0)
    return {**batch, "text_ids": torch.nn.functional.pad(ids, (0, extra), value=pad_id), "text_mask": mask}


class BadSample(Exception):
    """A sample that cannot be used; args[0] is the reason."""


def sample_text(sample: dict) -> str:
    raw = next((sample[k] for k in TEXT_KEYS if k in sample), None)
    if raw is None:
        raise BadSample("missing_text")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise BadSample("undecodable_text") from None
    text = " ".join(text.split())
    if not text:
        raise BadSample("empty_text")
    return text


def open_image(sample: dict) -> Image.Image:
    raw = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if raw is None:
        raise BadSample("missing_image")
    try:
        return Image.open(io.BytesIO(raw))
    except Exception:
        raise BadSample("unreadable_image") from None


def crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random resized crop; torchvision's RandomResizedCrop.get_params with `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centred crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    w, h = width, height
    if in_ratio < ratio[0]:
        h = round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """Crop `box` (left, top, w, h) from `img` and resize it to an RGB (size, size) image.

    For JPEGs, `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop is still at least
    `size` pixels there -- most of the decoding cost saved for large images.
    """
    left, top, w, h = box
    full_w, full_h = img.size
    img.draft("RGB", (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))
    fx, fy = img.size[0] / full_w, img.size[1] / full_h
    img = img.convert("RGB")
    region = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
    return img.resize((size, size), Image.BILINEAR, box=region)


def swap_left_right(text: str) -> str:
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1).lower() == "left" else "left", text)


def train_transform(
    sample: dict,
    rng: random.Random,
    *,
    image_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    hflip_text: str,
) -> tuple[np.ndarray, str]:
    """Random resized crop + horizontal flip; returns ((S, S, 3) uint8 image, caption). Raises BadSample.

    A flip mirrors left and right, so with hflip_text="swap" the caption's "left"/"right" are swapped
    too, and with "skip" captions that mention them are never flipped.
    """
    text = sample_text(sample)
    img = open_image(sample)
    try:
        img = crop_resize(img, crop_params(*img.size, scale, ratio, rng), image_size)
    except Exception:
        raise BadSample("unreadable_image") from None
    if rng.random() < hflip:
        spatial = _LEFT_RIGHT.search(text) is not None
        if not (spatial and hflip_text == "skip"):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if spatial and hflip_text == "swap":
                text = swap_left_right(text)
    return np.array(img), text


def eval_transform(sample: dict, *, image_size: int) -> tuple[np.ndarray, str]:
    """Resize the shorter side to image_size and take the centre square. Raises BadSample."""
    text = sample_text(sample)
    img = open_image(sample)
    try:
        w, h = img.size
        side = min(w, h)
        return np.array(crop_resize(img, ((w - side) // 2, (h - side) // 2, side, side), image_size)), text
    except Exception:
        raise BadSample("unreadable_image") from None


def collate(
    images: list[np.ndarray],
    texts: list[str],
    keys: list[str],
    tokenizer,
    max_text_len: int,
    num_skipped: int,
) -> dict:
    """Batch dict: image (B, 3, S, S) uint8 (see `normalize_image`), text_ids / text_mask (B, L) int64, key,
    num_skipped.

    text_ids are [CLS] tokens [SEP] then padding (id 0) up to the batch's longest text, truncated to
    L <= max_text_len: padding beyond the longest text would only cost compute.
    """
    planar = np.empty((len(images), 3, *images[0].shape[:2]), dtype=np.uint8)
    for out, pixels in zip(planar, images):
        out[...] = pixels.transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S); numpy's uint8 transposition is fast
    image = torch.from_numpy(planar)
    tok = tokenizer(texts, max_length=max_text_len, truncation=True, padding="longest", return_tensors="pt")
    return {
        "image": image,
        "text_ids": tok["input_ids"].long(),
        "text_mask": tok["attention_mask"].long(),
        "key": keys,
        "num_skipped": num_skipped,
    }
