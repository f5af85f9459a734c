"""Next-token prediction on text only, EVLM's loss in every stage.

Labels are aligned with `input_ids` and -100 wherever there is nothing to learn: media tokens, prompts,
user turns, padding. The token at position t + 1 is predicted from position t, except across a packed
document boundary (position id 0 starts a document: its first token has no context in the row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve_ds.objectives.base import ObjectiveConfig, register_objective

if TYPE_CHECKING:  # registering the objective must not import transformers
    from eve_ds.models.evlm.config import EVLMConfig
    from eve_ds.models.evlm.model import EVLMModel


def next_token_targets(labels: Tensor, position_ids: Tensor | None) -> Tensor:
    """labels, position_ids: (B, S) -> (B, S - 1) targets for logits[:, :-1], -100 where ignored."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = -100  # never predict a document's first token from the last one
    return targets


@register_objective("caption_lm")
class CaptionLM(nn.Module):
    """Cross-entropy of the backbone's logits on the labelled text tokens; no parameters of its own."""

    def __init__(self, model_cfg: EVLMConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()

    def forward(self, backbone: EVLMModel, batch: dict, generator: torch.Generator | None = None) -> dict:
        if "image" in batch and "images" not in batch:
            # The trainer normalises a batch's images under the data pipeline's key, `image` (N, 3, H, W).
            batch = {**batch, "images": batch["image"]}
        out = backbone(batch)
        targets = next_token_targets(batch["labels"], batch.get("position_ids"))
        keep = targets != -100
        logits = out.logits[:, :-1][keep].float()  # (T, V): only the labelled positions
        target = targets[keep]
        if target.numel() == 0:
            # Nothing to learn here (e.g. a packed row whose every image was unreadable). A zero loss over
            # the whole graph instead of an error: every parameter the forward used gets a zero gradient,
            # so the other data-parallel ranks' reductions and steps go on as on any micro-batch.
            zero = out.logits.float().sum() * 0.0
            return {
                "caption_lm_loss": zero,
                "caption_lm_tok_acc": zero.detach(),
                "caption_lm_tokens": zero.detach(),
                "encoder_outputs": [out],
            }
        return {
            "caption_lm_loss": F.cross_entropy(logits, target),
            "caption_lm_tok_acc": (logits.argmax(-1) == target).float().mean().detach(),
            "caption_lm_tokens": torch.tensor(
                float(target.numel()), device=logits.device
            ),  # labelled tokens in the micro-batch
            "encoder_outputs": [out],
        }
