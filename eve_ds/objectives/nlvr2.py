"""NLVR2 as the official EVE release fine-tunes it: the sentence is fused with each image of the pair
(two encoder passes, run here as one call over 2B rows), and a head decides True / False from both outputs.

Heads (`task.nlvr2_head`, passed to the objective as `head`):

- ``biattn`` [official]: each pass's whole output sequence attends to the other's (two cross-attentions),
  is fused with its own tokens, pooled by a learned attention pooling, and the two pooled vectors are
  classified. The released EVE code (models/model_nlvr_beit.py, ``biattn: True``) takes it from UNITER's
  paired-attention NLVR2 model; text padding is masked out of the keys and of the pooling.
- ``concat``: an MLP on the two text [CLS] outputs, concatenated (the release's other option, also VLMo's
  and BEiT-3's NLVR2 head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EVEModel
from eve_ds.models.layers import init_weights
from eve_ds.objectives.base import ObjectiveConfig, register_objective

HEADS = ("biattn", "concat")


class AttentionPool(nn.Module):
    """A learned score per token (Linear -> ReLU), softmax over the valid tokens, weighted sum."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(d, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x: (B, N, D), valid: (B, N) bool, at least one True per row -> (B, D)."""
        score = self.score(x).squeeze(-1).float().masked_fill(~valid, float("-inf"))
        weights = self.dropout(score.softmax(-1)).to(x.dtype)  # exactly 0 on padding
        return (weights.unsqueeze(1) @ x).squeeze(1)


class BiAttentionHead(nn.Module):
    """left, right: (B, N, D) outputs of the two passes -> logits (B, 2).

    l2r = Attn(q=left, k=v=right), r2l = Attn(q=right, k=v=left); each side -> fuse([attn; own]) (shared
    Linear(2D, D), ReLU, dropout) -> attention pooling (shared) -> Linear(2D, 2) on [left; right].
    Dropout 0.1 and PyTorch's default initialisation, as in the release.
    """

    def __init__(self, d: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn_l2r = nn.MultiheadAttention(d, num_heads, dropout=dropout, batch_first=True)
        self.attn_r2l = nn.MultiheadAttention(d, num_heads, dropout=dropout, batch_first=True)
        self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Dropout(dropout))
        self.pool = AttentionPool(d, dropout)
        self.classifier = nn.Linear(2 * d, 2)

    def forward(self, left: Tensor, right: Tensor, valid: Tensor, n_image: int) -> Tensor:
        """valid: (B, N) True on real tokens (both passes share the text, so one mask serves both)."""
        pad = ~valid
        l2r = self.attn_l2r(left, right, right, key_padding_mask=pad, need_weights=False)[0]
        r2l = self.attn_r2l(right, left, left, key_padding_mask=pad, need_weights=False)[0]
        left = self.fuse(torch.cat([l2r, left], -1))
        right = self.fuse(torch.cat([r2l, right], -1))
        return self.classifier(torch.cat([self.pool(left, valid), self.pool(right, valid)], -1))


class ConcatHead(nn.Module):
    """Linear(2D, 2D), LayerNorm, GELU, Linear(2D, 2) on [left text CLS; right text CLS] -> logits (B, 2)."""

    def __init__(self, d: int, norm_eps: float, init_std: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d, eps=norm_eps), nn.GELU(), nn.Linear(2 * d, 2)
        )
        self.mlp.apply(lambda m: init_weights(m, init_std))

    def forward(self, left: Tensor, right: Tensor, valid: Tensor, n_image: int) -> Tensor:
        return self.mlp(torch.cat([left[:, n_image], right[:, n_image]], -1))


@register_objective("nlvr2")
class NLVR2Classification(nn.Module):
    """Batch: image (B, 2, C, H, W) (left, right), text_ids / text_mask (B, L), label (B,) 1 = True.

    Outputs: nlvr2_logits (B, 2); with labels also nlvr2_loss (cross-entropy) and nlvr2_acc.
    """

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig, head: str = "biattn") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"nlvr2 head {head!r}: expected one of {list(HEADS)}")
        d = model_cfg.hidden_size
        if head == "biattn":
            self.head = BiAttentionHead(d, model_cfg.num_heads)
        else:
            self.head = ConcatHead(d, obj_cfg.head_norm_eps or model_cfg.norm_eps, model_cfg.init_std)

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        if image.dim() != 5 or image.shape[1] != 2:
            raise ValueError(f"nlvr2: batch['image'] must be (B, 2, C, H, W), got {tuple(image.shape)}")
        B = image.shape[0]
        # Columns that are padding in every row change nothing (padding is masked everywhere) but cost as
        # much as real tokens: NLVR2 sentences are far shorter than max_text_len.
        n = int(mask.sum(1).max())
        ids, mask = ids[:, :n], mask[:, :n]
        # Rows [left images; right images], each with the sentence: both passes in one encoder call.
        enc = encoder(image.transpose(0, 1).flatten(0, 1), ids.repeat(2, 1), mask.repeat(2, 1))
        left, right = enc.hidden.chunk(2)  # (B, N, D) each
        valid = torch.cat([mask.new_ones(B, enc.n_image).bool(), mask.bool()], 1)  # (B, N)
        logits = self.head(left, right, valid, enc.n_image).float()  # (B, 2)
        out = {"nlvr2_logits": logits.detach(), "encoder_outputs": [enc]}
        label = batch.get("label")
        if label is not None:
            out["nlvr2_loss"] = F.cross_entropy(logits, label)
            out["nlvr2_acc"] = (logits.argmax(1) == label).float().mean().detach()
        return out
