"""The LLaVA-style baseline EVLM's efficiency claim is measured against: the same frozen causal LM reading the
image tokens by concatenation (a linear projector d_img -> h, the s_img image tokens placed before the
text), next to `XAttnReader`, the same LM wrapped with EVLM's gated cross-attention. Both take image
features directly (the ViT is the same in both and is left out, as the paper's FLOPs ratio leaves it out)
and return the next-token loss on the text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve_ds.models.evlm.xattn import Media


def text_loss(logits: Tensor, text_ids: Tensor) -> Tensor:
    """logits: (B, T, V) over the text positions, text_ids: (B, T) -> next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), text_ids[:, 1:].flatten())


class ConcatReader(nn.Module):
    """lm: an HF causal LM (frozen here); feats (B, s_img, d_img) -> projected and put before the text."""

    def __init__(self, lm: nn.Module, d_img: int) -> None:
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.lm.config.use_cache = False
        self.proj = nn.Linear(d_img, lm.config.hidden_size)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: feats (B, s_img, d_img), text_ids (B, T)."""
        img = self.proj(batch["feats"])
        text = self.lm.get_input_embeddings()(batch["text_ids"])
        logits = self.lm(inputs_embeds=torch.cat([img, text], 1), use_cache=False).logits
        return {"loss": text_loss(logits[:, img.shape[1] :], batch["text_ids"])}


class XAttnReader(nn.Module):
    """evlm: an `EVLMModel` (its LM frozen, cross-attention and media tokens trainable); the row is the K
    media tokens of one image followed by the text, every token seeing that image."""

    def __init__(self, evlm: nn.Module) -> None:
        super().__init__()
        self.evlm = evlm

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: feats (B, s_img, d_img), text_ids (B, T)."""
        m = self.evlm
        text_ids, feats = batch["text_ids"], batch["feats"]
        B, K = text_ids.shape[0], m.cfg.num_media_tokens
        ids = torch.cat([text_ids.new_full((B, K), m.media_token_id), text_ids], 1)
        lo = ids.new_zeros(ids.shape)  # every query: image slot 0 (+ the null key)
        media = Media([feats[:, None]] * len(m.cfg.feature_layers), lo, lo.clone())
        x = m.embed(ids, ids.new_ones(B))
        logits = m.lm(inputs_embeds=x, media=media, use_cache=False).logits
        return {"loss": text_loss(logits[:, K:], text_ids)}
