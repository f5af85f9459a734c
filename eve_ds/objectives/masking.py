"""Random masks for MLM (text) and MIM (image patches)."""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from eve_ds.utils.text import maskable_text_positions


def text_mask_counts(text_mask: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """-> (maskable positions (B, L) bool, tokens each caption masks (B, 1) long): round(ratio * n) of its
    n maskable tokens, at least one (none when it has none)."""
    maskable = maskable_text_positions(text_mask)
    n = maskable.sum(1, keepdim=True)
    return maskable, torch.clamp(torch.round(n.float() * ratio), min=1).long().minimum(n)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def masked_text_count(batch: dict, ratio: float) -> int | None:
    """How many text tokens `mask_text` masks in `batch`, from the host-side count of maskable tokens per
    caption (`batch["text_maskable"]`, set by the data path); None when the batch does not have it.

    Pure Python, so that nothing is read from a tensor: `text_mask_counts` multiplies in float32 (the
    scalar ratio is cast to float32) and rounds half to even; the product of two float32 is exact in a
    double, so rounding it to float32 gives the same number, and Python's `round` is half to even too."""
    maskable = batch.get("text_maskable")
    if maskable is None:
        return None
    r = _float32(ratio)
    return sum(min(max(round(_float32(_float32(float(n)) * r)), 1), n) for n in maskable)


def text_positions(mask: Tensor, n_image: int, count: int | None) -> Tensor:
    """mask: (B, L) over the text part of a [image (n_image); text (L)] sequence -> (count,) positions of its
    True entries in the flattened (B * (n_image + L)) sequence, row-major, as boolean indexing orders them.
    With the host-known count the index has a static size (`nonzero_static`: no host sync on CUDA);
    None finds it with `nonzero` (a sync)."""
    flat = torch.nn.functional.pad(mask, (n_image, 0)).reshape(-1)
    if count is None:
        return flat.nonzero().squeeze(1)
    return torch.nonzero_static(flat, size=count).squeeze(1)


def mask_text(
    text_ids: Tensor,
    text_mask: Tensor,
    ratio: float,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace round(ratio * n) of each caption's n maskable tokens (at least one) by [MASK].

    -> (masked ids (B, L), mlm_mask (B, L) True where a token was masked).
    """
    maskable, n_mask = text_mask_counts(text_mask, ratio)
    noise = torch.rand(text_ids.shape, device=text_ids.device, generator=generator)
    noise = noise.masked_fill(~maskable, 2.0)  # non-maskable positions sort last
    rank = noise.argsort(1).argsort(1)
    mlm_mask = rank < n_mask
    return text_ids.masked_fill(mlm_mask, mask_token_id), mlm_mask


def mask_patches(
    batch_size: int,
    num_patches: int,
    ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking of `ratio` of the patches.

    -> keep_ids (B, n_keep) sorted visible patch indices, ids_restore (B, P) position of each patch in
    [visible; masked] order, mask (B, P) 1.0 on masked patches.
    """
    n_keep = int(num_patches * (1 - ratio))
    if n_keep < 1:
        raise ValueError(f"image mask ratio {ratio} leaves no visible patch of {num_patches}")
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(1)
    # Visible patches in grid order (sorting keeps the sequence readable; the encoder is order-free).
    keep_ids = ids_shuffle[:, :n_keep].sort(1).values
    masked_ids = ids_shuffle[:, n_keep:]
    ids_restore = torch.cat([keep_ids, masked_ids], 1).argsort(1)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask.scatter_(1, keep_ids, 0.0)
    return keep_ids, ids_restore, mask


def patchify(image: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, P, p*p*C), patches in row-major grid order, pixels (p, p, C) within a patch."""
    B, C, H, W = image.shape
    p = patch_size
    x = image.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)
