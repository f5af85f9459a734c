"""Random masks for MLM (text) and MIM (image patches)."""

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
    maskable = maskable_text_positions(text_mask)
    n = maskable.sum(1, keepdim=True)
    n_mask = torch.clamp(torch.round(n.float() * ratio), min=1).long().minimum(n)
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
