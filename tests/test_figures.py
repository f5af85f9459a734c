"""The Grad-CAM overlay lands on the part of the image the model saw: the centre square (`square_crop`) or
the whole image stretched to a square (`official`), on a non-square image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.infer import figures


def one_hot_patch(row: int, col: int, grid: int = 4) -> torch.Tensor:
    heat = torch.zeros(grid, grid)
    heat[row, col] = 1.0
    return heat


@pytest.mark.parametrize("size", [(200, 100), (100, 200)])
def test_square_crop_overlay_covers_the_centre_square_only(size):
    w, h = size
    full = figures.heat_on_image(Image.new("RGB", size), one_hot_patch(0, 3), "square_crop")
    assert full.shape == (h, w)
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    outside = np.ones((h, w), bool)
    outside[top : top + side, left : left + side] = False
    assert full[outside].max() == 0.0
    # patch (row 0, col 3) of the 4 x 4 grid: the top-right quarter-by-quarter of the centre square
    p = side // 4
    assert full[top + p // 2, left + 3 * p + p // 2] > 0.9
    assert full[top + p // 2, left + p // 2] < 0.05  # the top-left patch of the square
    assert np.unravel_index(full.argmax(), full.shape)[1] >= left + 2 * p


@pytest.mark.parametrize("size", [(200, 100), (100, 200)])
def test_official_overlay_is_stretched_over_the_whole_image(size):
    w, h = size
    full = figures.heat_on_image(Image.new("RGB", size), one_hot_patch(3, 3), "official")
    assert full.shape == (h, w)
    pw, ph = w // 4, h // 4  # one patch covers a quarter of each side of the image
    assert full[3 * ph + ph // 2, 3 * pw + pw // 2] > 0.9  # the bottom-right corner's patch
    assert full[3 * ph + ph // 2, pw // 2] < 0.05  # the bottom-left one
    assert full[ph // 2, 3 * pw + pw // 2] < 0.05  # the top-right one
    row, col = np.unravel_index(full.argmax(), full.shape)
    assert row >= 2 * ph and col >= 2 * pw
    # square_crop on the same image would leave the bottom-right corner of a 200 x 100 image cold
    if w > h:
        cropped = figures.heat_on_image(Image.new("RGB", size), one_hot_patch(3, 3), "square_crop")
        assert cropped[3 * ph + ph // 2, 3 * pw + pw // 2] == 0.0


def test_unknown_geometry_is_rejected():
    with pytest.raises(ValueError, match="expected 'square_crop' or 'official'"):
        figures.heat_on_image(Image.new("RGB", (20, 10)), one_hot_patch(0, 0), "letterbox")


def test_heatmap_figure_writes_a_png_for_both_geometries(tmp_path):
    image = Image.new("RGB", (120, 60), (40, 40, 40))
    for geometry in ("square_crop", "official"):
        path = tmp_path / f"{geometry}.png"
        figures.heatmap_figure(image, one_hot_patch(1, 2), geometry, str(path), geometry)
        with Image.open(path) as im:
            assert im.format == "PNG"
