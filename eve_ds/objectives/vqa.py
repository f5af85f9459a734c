"""VQA v2 as the official EVE release fine-tunes it: one fusion pass over [image; question], a classifier
over the answer vocabulary on the text [CLS] output, binary cross-entropy against soft scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EVEModel
from eve_ds.models.layers import init_weights
from eve_ds.objectives.base import ObjectiveConfig, register_objective


@register_objective("vqa")
class VQAClassification(nn.Module):
    """Head: Linear(D, 2D), LayerNorm, GELU, Linear(2D, A) on the text [CLS] (hidden[:, n_image]).

    Loss: BCE with logits against the soft targets (B, A), summed over answers and averaged over the batch
    (mean x A, as in the official code); `vqa_train_score` = the soft score of the top answer.
    """

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig, num_answers: int = 3129) -> None:
        """num_answers: the answer vocabulary's size (the task's, from its training data)."""
        super().__init__()
        d = model_cfg.hidden_size
        self.head = nn.Sequential(
            nn.Linear(d, 2 * d),
            nn.LayerNorm(2 * d, eps=obj_cfg.head_norm_eps or model_cfg.norm_eps),
            nn.GELU(),
            nn.Linear(2 * d, num_answers),
        )
        self.head.apply(lambda m: init_weights(m, model_cfg.init_std))

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        enc = encoder(
            batch["image"],
            batch["text_ids"],
            batch["text_mask"],
            has_padding=batch.get("text_padded"),
            text_real=batch.get("text_real"),
        )
        logits = self.head(enc.hidden[:, enc.n_image]).float()  # (B, A)
        out = {"vqa_logits": logits.detach(), "encoder_outputs": [enc]}
        targets = batch.get("targets")
        if targets is not None:  # test splits have none
            targets = targets.float()
            out["vqa_loss"] = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
            out["vqa_train_score"] = targets.gather(1, logits.argmax(1, keepdim=True)).mean().detach()
        return out
