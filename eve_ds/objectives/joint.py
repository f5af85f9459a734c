"""Joint masking (EVE Table 5, †): MLM and pixel MIM from ONE encoder pass in which both modalities are
masked at once, instead of MSM's two passes (masked text + complete image; masked image + complete text).

Text: `text_mask_ratio` of each caption's real tokens become [MASK] (as in MLM). Image:
`joint_image_mask_ratio` of the patches are dropped before the encoder, MAE-style, and the pixel decoder
reconstructs them from the visible ones -- not replaced by a mask token. Dropping is how EVE's own MIM pass
masks, so the ablation changes one thing only (one pass with both masks instead of two passes, each with
one); it keeps the same pixel decoder and the same encoder weights (no mask token that MSM checkpoints lack),
and a masked patch costs nothing in the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EVEModel
from eve_ds.objectives.base import ObjectiveConfig, register_objective
from eve_ds.objectives.masking import mask_patches, mask_text, masked_text_count, text_positions
from eve_ds.objectives.msm import MaskedImageModeling, MaskedLanguageModeling


@register_objective("msm_joint")
class JointMaskedSignalModeling(nn.Module):
    """One pass over [visible patches; masked text] -> `mlm_loss` on the masked tokens and `mim_pixel_loss`
    on the dropped patches (named as the two objectives it joins). The heads are MSM's: `mlm.head`
    (MLMHead) and `mim.decoder` (PixelDecoder), with MSM's pixel target (`mim.target`, norm_pix_loss
    included)."""

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg, self.model_cfg = obj_cfg, model_cfg
        self.mlm = MaskedLanguageModeling(model_cfg, obj_cfg)
        self.mim = MaskedImageModeling(model_cfg, obj_cfg)

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        image, text_ids, text_mask = batch["image"], batch["text_ids"], batch["text_mask"]
        ids, mlm_mask = mask_text(
            text_ids, text_mask, self.cfg.text_mask_ratio, self.cfg.mask_token_id, generator
        )  # (B, L), (B, L) True where masked
        B, P = image.shape[0], self.model_cfg.num_patches
        keep_ids, ids_restore, patch_mask = mask_patches(
            B, P, self.cfg.joint_image_mask_ratio, image.device, generator
        )  # (B, n_keep), (B, P), (B, P) 1.0 where dropped
        enc = encoder(
            image,
            ids,
            text_mask,
            keep_ids=keep_ids,
            has_padding=batch.get("text_padded"),
            text_real=batch.get("text_real"),
        )
        # (T, V), masked positions only, gathered by an index of host-known size (as in MLM)
        where = text_positions(mlm_mask, enc.n_image, masked_text_count(batch, self.cfg.text_mask_ratio))
        logits = self.mlm.head(enc.hidden.reshape(-1, enc.hidden.shape[-1]).index_select(0, where)).float()
        target = text_ids.reshape(-1).index_select(0, text_positions(mlm_mask, 0, where.numel()))
        pred_tokens = logits.argmax(-1)
        pixels = self.mim.decoder(enc.image, ids_restore).float()  # (B, P, p*p*C)
        per_patch = (pixels - self.mim.target(batch)).pow(2).mean(-1)  # (B, P)
        return {
            "mlm_loss": F.cross_entropy(logits, target),
            "mlm_acc": (pred_tokens == target).float().mean().detach(),
            "mlm_pred": pred_tokens.detach(),
            "mlm_target": target,
            "mim_pixel_loss": (per_patch * patch_mask).sum() / patch_mask.sum(),
            "encoder_outputs": [enc],
        }
