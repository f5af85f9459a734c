"""Vision towers returning hierarchical features: a list of (N, 1 + P, D) block outputs, one per level.

`TimmVision` wraps any timm model with `forward_intermediates` (EVA02 / EVA-CLIP-E, ViT), prefix tokens
included and no final norm (EVLM removes it). Blocks after the last level, the final norm and the head are
removed with timm's own `prune_intermediate_layers`. `EVEVision` reads the block outputs of EVE-DS's encoder
through forward hooks on an image-only pass. Both expose `blocks`, so `set_trainable_from` can unfreeze the
latter part of either tower.
"""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn

from eve_ds.models.config import get_config as get_eve_config
from eve_ds.models.eve import EVEModel
from eve_ds.models.evlm.config import EVLMConfig


class TimmVision(nn.Module):
    """vit: a timm model; indices: 0-based blocks whose outputs are the feature levels."""

    def __init__(self, vit: nn.Module, indices: list[int]) -> None:
        super().__init__()
        vit.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self.vit, self.indices = vit, list(indices)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    def forward(self, images: Tensor) -> list[Tensor]:
        """images: (N, 3, H, W) -> [(N, 1 + P, D)] per level, prefix tokens first."""
        levels = self.vit.forward_intermediates(
            images,
            indices=self.indices,
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return [torch.cat([prefix, x], dim=1) for x, prefix in levels]


class EVEVision(nn.Module):
    """encoder: an EVEModel; indices: 0-based blocks whose image-only outputs are the feature levels."""

    def __init__(self, encoder: EVEModel, indices: list[int]) -> None:
        super().__init__()
        self.encoder, self.indices = encoder, list(indices)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.blocks

    def forward(self, images: Tensor) -> list[Tensor]:
        """images: (N, 3, H, W) -> [(N, 1 + P, D)] per level ([cls; patches] of the block outputs)."""
        found: dict[int, Tensor] = {}
        hooks = [
            self.encoder.blocks[i].register_forward_hook(lambda m, a, out, i=i: found.__setitem__(i, out[0]))
            for i in self.indices
        ]
        try:
            self.encoder(image=images)
        finally:
            for h in hooks:
                h.remove()
        return [found[i] for i in self.indices]


def check_eve_tower(cfg: EVLMConfig, encoder: EVEModel) -> None:
    """The loaded EVE encoder must be the tower the config describes (image size, patch, depth)."""
    e = encoder.cfg
    for key, want, have in (
        ("image_size", cfg.image_size, e.image_size),
        ("vision_patch", cfg.vision_patch, e.patch_size),
        ("vision_depth", cfg.vision_depth, e.num_layers),
    ):
        if want != have:
            raise ValueError(
                f"model.{key}={want} but the EVE tower of {cfg.vision_path or 'the config'} has {have}"
            )


def set_trainable_from(tower: nn.Module, fraction: float | None) -> list[nn.Parameter]:
    """Freeze the tower, then unfreeze its blocks from int(fraction * depth) on (None: all frozen).
    -> the parameters made trainable."""
    tower.requires_grad_(False)
    if fraction is None:
        return []
    blocks = tower.blocks
    params = [p for b in blocks[int(fraction * len(blocks)) :] for p in b.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def build_vision(cfg: EVLMConfig, encoder: EVEModel | None = None) -> nn.Module:
    """The tower of `cfg`; weights from `cfg.vision_path` (a local file) when set, never from a hub.
    encoder: an EVE encoder already loaded (from a run or a checkpoint) for `vision: eve`."""
    if cfg.vision == "eve":
        overrides = {k: v for k, v in cfg.vision_kwargs.items() if k != "flavor"}
        flavor = cfg.vision_kwargs.get("flavor", "eve_tiny")
        eve_cfg = get_eve_config(flavor, image_size=cfg.image_size, patch_size=cfg.vision_patch, **overrides)
        if encoder is None:
            encoder = EVEModel.from_pretrained(cfg.vision_path) if cfg.vision_path else EVEModel(eve_cfg)
        check_eve_tower(cfg, encoder)
        tower: nn.Module = EVEVision(encoder, cfg.feature_layers)
        width = encoder.cfg.hidden_size
    else:
        kwargs = dict(
            img_size=cfg.image_size,
            patch_size=cfg.vision_patch,
            embed_dim=cfg.vision_width,
            depth=cfg.vision_depth,
            mlp_ratio=cfg.vision_mlp / cfg.vision_width,
            num_classes=0,
            **cfg.vision_kwargs,
        )
        if cfg.vision_path:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=cfg.vision_path))
        tower = TimmVision(timm.create_model(cfg.vision_name, **kwargs), cfg.feature_layers)
        width = tower.vit.embed_dim
    if width != cfg.vision_width:
        raise ValueError(f"model.vision_width={cfg.vision_width} but the built tower is {width} wide")
    return tower
