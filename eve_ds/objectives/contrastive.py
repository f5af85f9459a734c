"""Baselines for the Table 1 benchmark: image-text contrastive (ITC) and image-text matching (ITM)
through the shared encoder, as in ALBEF / VLMo.

ITC runs an image-only and a text-only pass, projects the two [CLS] outputs and applies a symmetric InfoNCE
with a learnable temperature over the features of every data-parallel rank. ITM runs fusion passes of the
positive pairs and of hard negatives drawn from ITC's similarities, and classifies the text [CLS] output.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EVEModel
from eve_ds.models.layers import init_weights
from eve_ds.objectives.base import ObjectiveConfig, register_objective


def gather_features(x: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int]:
    """x: (B, E) local features -> ((world * B, E) features of every rank of `group`, offset of ours).

    The gather keeps the autograd graph of the local shard (its backward sums the gradients that every
    rank's loss sends to our features), so each rank may compute the loss of its own rows only.
    Equal local batch sizes are assumed, as in open_clip. Without a process group it is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, 0
    parts = dist_fn.all_gather(x, group=group or dist.group.WORLD)
    return torch.cat(parts, dim=0), dist.get_rank(group) * x.shape[0]


def info_nce(
    img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, offset: int, logit_scale: Tensor
) -> Tensor:
    """Symmetric InfoNCE of the local rows. img, txt: (B, E) normalised local features; *_all: (G, E) of
    every rank, local ones at rows [offset, offset + B). -> mean of image->text and text->image losses."""
    labels = torch.arange(img.shape[0], device=img.device) + offset
    logits_i2t = logit_scale * img @ txt_all.t()  # (B, G)
    logits_t2i = logit_scale * txt @ img_all.t()  # (B, G)
    return (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2


@register_objective("itc")
class ImageTextContrastive(nn.Module):
    """Image-only and text-only passes; projections of the image [CLS] (hidden[:, 0]) and the text [CLS]
    (hidden[:, 0] of the text-only pass) to `itc_embed_dim`; symmetric InfoNCE, temperature learned as
    open_clip's log logit scale (clamped at 100).

    Leaves ``batch["context"]["itc"] = {"sim_i2t": (B, B), "sim_t2i": (B, B)}`` (local pairs, detached)
    for ITM's hard negatives.
    """

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        d, e = model_cfg.hidden_size, obj_cfg.itc_embed_dim
        self.image_proj = nn.Linear(d, e)
        self.text_proj = nn.Linear(d, e)
        for m in (self.image_proj, self.text_proj):
            init_weights(m, model_cfg.init_std)
        # Shape (1,), not (): DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot take.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / obj_cfg.itc_init_temperature)))
        # The data-parallel group to gather over; None = the default (world) group. Set from outside.
        self.process_group: dist.ProcessGroup | None = None

    def features(self, encoder: EVEModel, batch: dict) -> tuple[Tensor, Tensor, list]:
        """-> (image features (B, E), text features (B, E), normalised; the two encoder outputs)."""
        enc_i = encoder(image=batch["image"])
        enc_t = encoder(text_ids=batch["text_ids"], text_mask=batch["text_mask"])
        img = F.normalize(self.image_proj(enc_i.hidden[:, 0]).float(), dim=-1)
        txt = F.normalize(self.text_proj(enc_t.hidden[:, 0]).float(), dim=-1)
        return img, txt, [enc_i, enc_t]

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        img, txt, calls = self.features(encoder, batch)
        img_all, offset = gather_features(img, self.process_group)
        txt_all, _ = gather_features(txt, self.process_group)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp().squeeze(0)
        loss = info_nce(img, txt, img_all, txt_all, offset, scale)
        with torch.no_grad():
            sim = scale * img @ txt.t()  # (B, B) local pairs
            acc = (sim.argmax(1) == torch.arange(sim.shape[0], device=sim.device)).float().mean()
        if "context" in batch:
            batch["context"]["itc"] = {"sim_i2t": sim, "sim_t2i": sim.t()}
        return {
            "itc_loss": loss,
            "itc_acc": acc,
            "itc_temperature": (1 / scale).detach(),
            "encoder_outputs": calls,
        }


def sample_hard_negatives(sim: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """sim: (B, B) similarities of row i to candidate j; -> (B,) one index per row, drawn with probability
    ∝ softmax(sim[i]) among j != i (ALBEF). Needs B >= 2."""
    if sim.shape[0] < 2:
        raise ValueError("ITM hard negatives need a local batch of at least 2 pairs")
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    # Softmax over the negatives only: the same proportions as ALBEF's softmax with the positive zeroed,
    # and a row never sums to zero (its largest negative gets weight > 0 even if the positive dominates).
    weights = F.softmax(sim.float().masked_fill(eye, float("-inf")), dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@register_objective("itm")
class ImageTextMatching(nn.Module):
    """One fusion pass over 3B pairs: B positives, B (image, hard-negative text), B (hard-negative image,
    text); 2-way classifier on the text [CLS] output (hidden[:, n_image]). Requires ITC before it."""

    requires = ("itc",)

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.head = nn.Linear(model_cfg.hidden_size, 2)
        trunc_normal_(self.head.weight, std=model_cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        itc = batch.get("context", {}).get("itc")
        if itc is None:
            raise RuntimeError("itm reads ITC's similarities: list itc before itm in objective.objectives")
        image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        B = image.shape[0]
        neg_text = sample_hard_negatives(itc["sim_i2t"], generator)  # (B,) a text for each image
        neg_image = sample_hard_negatives(itc["sim_t2i"], generator)  # (B,) an image for each text
        enc = encoder(
            torch.cat([image, image, image[neg_image]]),
            torch.cat([ids, ids[neg_text], ids]),
            torch.cat([mask, mask[neg_text], mask]),
        )
        logits = self.head(enc.hidden[:, enc.n_image]).float()  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        return {
            "itm_loss": F.cross_entropy(logits, labels),
            "itm_acc": (logits.argmax(1) == labels).float().mean().detach(),
            "encoder_outputs": [enc],
        }
