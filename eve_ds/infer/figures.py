"""PNG figures of `eve_ds.infer.attribution` results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from torch import Tensor


def seen_box(w: int, h: int, geometry: str) -> tuple[int, int, int, int]:
    """The part of a w x h image that the model's S x S input shows, as (left, top, right, bottom), for
    task.image_geometry `geometry` as evaluation decodes it (`eve_ds.tasks.base.decode_image`): the
    centre square (`square_crop`) or the whole image, stretched to a square (`official`)."""
    if geometry == "official":
        return 0, 0, w, h
    if geometry != "square_crop":
        raise ValueError(f"image geometry {geometry!r}: expected 'square_crop' or 'official'")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def heat_on_image(image: Image.Image, heat: Tensor, geometry: str = "square_crop") -> np.ndarray:
    """(G, G) heat -> (H, W) at the image's own resolution, min-max scaled to [0, 1]: upsampled over the
    part of the image the model saw (`seen_box`), 0 outside it."""
    w, h = image.size
    left, top, right, bottom = seen_box(w, h, geometry)
    grid = heat.numpy().astype(np.float32)
    span = grid.max() - grid.min()
    grid = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
    up = Image.fromarray(grid).resize((right - left, bottom - top), Image.BILINEAR)
    full = np.zeros((h, w), dtype=np.float32)
    full[top:bottom, left:right] = np.asarray(up)
    return full


def heatmap_figure(
    image: Image.Image, heat: Tensor, title: str, path: str, geometry: str = "square_crop"
) -> None:
    """The image with the Grad-CAM map over it (placed by `geometry`, as `heat_on_image`), side by side
    with the bare image."""
    image = image.convert("RGB")
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    for ax in axes:
        ax.imshow(image)
        ax.axis("off")
    axes[1].imshow(heat_on_image(image, heat, geometry), cmap="jet", alpha=0.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def word_bars_figure(
    image: Image.Image,
    masked: np.ndarray,
    tokens: list[str],
    values: list[float],
    title: str,
    path: str,
    geometry: str = "square_crop",
) -> None:
    """The image with its masked patches greyed out (placed by `geometry`, as `heat_on_image`), and
    per-word Grad-CAM values as bars under it. masked: (G, G) bool over the patch grid."""
    image = image.convert("RGB")
    w, h = image.size
    left, top, right, bottom = seen_box(w, h, geometry)
    shade = np.asarray(Image.fromarray(masked.astype(np.uint8) * 255).resize((right - left, bottom - top)))
    rgb = np.asarray(image).copy()
    rgb[top:bottom, left:right][shade > 127] = 128
    fig, (ax, bars) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1.4]})
    ax.imshow(rgb)
    ax.axis("off")
    bars.bar(range(len(tokens)), values, color="tab:orange")
    bars.set_xticks(range(len(tokens)), tokens, rotation=60, fontsize=8)
    bars.set_ylabel("Grad-CAM")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def routing_figure(counts: Tensor, block: int, path: str) -> None:
    """counts: (2, E) routes of image / text tokens -> per expert, the share of each modality's routes."""
    share = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    experts = np.arange(share.shape[1])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(experts) + 2), 3))
    ax.bar(experts - 0.2, share[0], 0.4, label="image tokens")
    ax.bar(experts + 0.2, share[1], 0.4, label="text tokens")
    ax.set_xticks(experts)
    ax.set_xlabel("expert")
    ax.set_ylabel("share of the modality's routes")
    ax.set_title(f"routing of soft block {block}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
