"""Pre-training heads: the MLM text decoder and the MAE-style MIM pixel decoder (paper eq. 8-9)."""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block as ViTBlock
from torch import Tensor, nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.layers import init_weights


class MLMHead(nn.Module):
    """Two-layer MLP text decoder: Linear -> GELU -> LayerNorm -> Linear to the vocabulary."""

    def __init__(self, cfg: EVEConfig) -> None:
        super().__init__()
        h = cfg.mlm_head_hidden or cfg.hidden_size
        self.dense = nn.Linear(cfg.hidden_size, h)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(h, eps=1e-12)
        self.decoder = nn.Linear(h, cfg.vocab_size)
        self.apply(lambda m: init_weights(m, cfg.init_std))

    def forward(self, x: Tensor) -> Tensor:
        """x: (T, D) hidden states of masked positions only -> (T, V) logits."""
        return self.decoder(self.norm(self.act(self.dense(x))))


class PixelDecoder(nn.Module):
    """Light MAE decoder: encoder image tokens + mask tokens + decoder position embeddings -> pixels."""

    def __init__(self, cfg: EVEConfig) -> None:
        super().__init__()
        w = cfg.decoder_width
        self.embed = nn.Linear(cfg.hidden_size, w)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, w))
        self.blocks = nn.ModuleList(
            ViTBlock(
                w,
                cfg.decoder_heads,
                mlp_ratio=cfg.decoder_ffn_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.pred = nn.Linear(w, cfg.patch_size**2 * cfg.in_chans)
        self.apply(lambda m: init_weights(m, cfg.init_std))
        trunc_normal_(self.mask_token, std=cfg.init_std)
        trunc_normal_(self.pos_embed, std=cfg.init_std)

    def forward(self, image_tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """image_tokens: (B, 1 + n, D) encoder outputs [cls; visible patches];
        ids_restore: (B, P) position of each grid patch in [visible; masked] order -> (B, P, p*p*C)."""
        x = self.embed(image_tokens)
        B, n1, w = x.shape
        P = ids_restore.shape[1]
        masked = self.mask_token.expand(B, P + 1 - n1, -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, w))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]
