"""Masked signal modeling (paper eq. 8-10): MLM on complete image + masked text, MIM on masked image +
complete text with an asymmetric MAE-style pixel decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EVEModel
from eve_ds.models.heads import MLMHead, PixelDecoder
from eve_ds.objectives.base import ObjectiveConfig, register_objective
from eve_ds.objectives.masking import mask_patches, mask_text, masked_text_count, patchify, text_positions
from eve_ds.utils.image import normalize_image


@register_objective("mlm")
class MaskedLanguageModeling(nn.Module):
    """Complete image + text with `text_mask_ratio` of its real tokens masked -> predict them."""

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = obj_cfg
        self.head = MLMHead(model_cfg)

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        ids, mlm_mask = mask_text(
            batch["text_ids"], batch["text_mask"], self.cfg.text_mask_ratio, self.cfg.mask_token_id, generator
        )
        enc = encoder(
            batch["image"],
            ids,
            batch["text_mask"],
            has_padding=batch.get("text_padded"),
            text_real=batch.get("text_real"),
        )
        # Logits only where a token was masked: the vocabulary projection dominates the head's cost. The
        # masked positions are gathered by an index of host-known size, not a boolean mask (a host sync).
        where = text_positions(mlm_mask, enc.n_image, masked_text_count(batch, self.cfg.text_mask_ratio))
        logits = self.head(enc.hidden.reshape(-1, enc.hidden.shape[-1]).index_select(0, where)).float()
        target = batch["text_ids"].reshape(-1).index_select(0, text_positions(mlm_mask, 0, where.numel()))
        pred = logits.argmax(-1)
        return {
            "mlm_loss": F.cross_entropy(logits, target),
            "mlm_acc": (pred == target).float().mean().detach(),
            "mlm_pred": pred.detach(),
            "mlm_target": target,
            "encoder_outputs": [enc],
        }


@register_objective("mim_pixel")
class MaskedImageModeling(nn.Module):
    """Visible patches (1 - `image_mask_ratio`) + complete text -> reconstruct raw pixels of the masked
    patches; no mask token enters the encoder."""

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg, self.model_cfg = obj_cfg, model_cfg
        self.decoder = PixelDecoder(model_cfg)

    def target(self, batch: dict) -> Tensor:
        """(B, P, p*p*C) float32 pixels (normalised per patch with norm_pix_loss, as in MAE), computed from
        the uint8 `pixels` when the batch has them, so that a bf16 run's target is not bf16-rounded."""
        image = normalize_image(batch["pixels"]) if "pixels" in batch else batch["image"].float()
        t = patchify(image, self.model_cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        image = batch["image"]
        keep_ids, ids_restore, mask = mask_patches(
            image.shape[0], self.model_cfg.num_patches, self.cfg.image_mask_ratio, image.device, generator
        )
        enc = encoder(
            image,
            batch["text_ids"],
            batch["text_mask"],
            keep_ids=keep_ids,
            has_padding=batch.get("text_padded"),
            text_real=batch.get("text_real"),
        )
        pred = self.decoder(enc.image, ids_restore).float()  # (B, P, p*p*C)
        per_patch = (pred - self.target(batch)).pow(2).mean(-1)  # (B, P), float32
        return {
            "mim_pixel_loss": (per_patch * mask).sum() / mask.sum(),
            "encoder_outputs": [enc],
        }
