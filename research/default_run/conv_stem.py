"""`eve-pretrain` with a per-patch convolutional stem in place of the linear patch embedding (an experiment of
research/default_run/README.md, not part of the package).

    python -m research.default_run.conv_stem [eve-pretrain arguments ...]

Each p x p patch goes through its own small CNN (weights shared across patches): 3x3 stride-2 convolutions
with GELU halve it to 4 x 4 (hidden_size / 4, then / 2 channels), then a 4 x 4 convolution gives the
hidden_size-wide token. No receptive field crosses a patch border, so the patches that MIM masks stay hidden
from the visible ones. State-dict names differ from the linear embedding (`patch_embed.stem.*`), so such a
run's checkpoints only load with this script.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

import eve_ds.models.eve as eve


class ConvPatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch, self.grid = patch_size, img_size // patch_size
        layers, channels, side, widths = [], in_chans, patch_size, [dim // 4, dim // 2]
        while side > 4:
            width = widths[min(len(layers) // 2, 1)]
            layers += [nn.Conv2d(channels, width, 3, 2, 1), nn.GELU()]
            channels, side = width, side // 2
        layers.append(nn.Conv2d(channels, dim, side, side))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, P, dim), patches in row-major order as timm's PatchEmbed."""
        B, C = x.shape[:2]
        p, g = self.patch, self.grid
        x = x.view(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, C, p, p)
        return self.stem(x).view(B, g * g, -1)


if __name__ == "__main__":
    eve.PatchEmbed = ConvPatchEmbed
    from eve_ds.cli.pretrain import main

    sys.exit(main())
