"""Baselines for the Table 1 benchmark: image-text contrastive (ITC) and image-text matching (ITM)
through the shared encoder, as in ALBEF / VLMo.

ITC runs an image-only and a text-only pass, projects the two [CLS] outputs and applies a symmetric InfoNCE
with a learnable temperature over the features of every data-parallel rank. ITM runs fusion passes of the
positive pairs and of hard negatives drawn from ITC's similarities, and classifies the text [CLS] output.

Image-text retrieval fine-tunes the same two objectives (`eve_ds/tasks/retrieval/task.py`). Its batches carry
`image_id` (B,): several captions of one image may share a batch, and, as in ALBEF, every pair with the
same image id is then a positive -- ITC's targets spread over all of a row's positives, and ITM never draws
a caption of the same image as a hard negative. Without `image_id` (pre-training pairs, Table 1) each pair
is its own only positive.

ITM's hard negatives come from the local micro-batch (`objective.itm_negatives=local`) or, as in ALBEF and
the official EVE code, from the global batch of every data-parallel rank (`global`): ITC's similarities of
the local rows to every rank's features, and the inputs (pixels, text ids) of the picked candidates
gathered without gradient -- EVE fuses raw pairs, so a negative of another rank is fused here again.
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
from eve_ds.models.eve import EncoderOutput, EVEModel
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


def gather_ids(ids: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """ids: (B, ...) local tensor (image ids, pixels, text ids) -> (world * B, ...) of every rank of
    `group`, in rank order (the order of `gather_features`). No gradient flows through the gather."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, ids.detach().contiguous(), group=group)
    return torch.cat(parts)


def own_pairs(b: int, g: int, offset: int, device: torch.device) -> Tensor:
    """(b, g) bool: local row i matches global column offset + i only (pairs without image ids)."""
    pos = torch.zeros(b, g, dtype=torch.bool, device=device)
    pos[torch.arange(b, device=device), offset + torch.arange(b, device=device)] = True
    return pos


def info_nce(
    img: Tensor,
    txt: Tensor,
    img_all: Tensor,
    txt_all: Tensor,
    offset: int,
    logit_scale: Tensor,
    positives: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE of the local rows. img, txt: (B, E) normalised local features; *_all: (G, E) of
    every rank, local ones at rows [offset, offset + B); positives: (B, G) bool, the columns that match
    local row i (the pairs of its image, in both directions); None = column offset + i only.
    -> mean of the image->text and text->image losses.

    With `positives` the target of a row is uniform over its positives (ALBEF's retrieval fine-tuning):
    -sum_j t_ij log softmax(logits_i)_j with t_ij = positives_ij / sum_j positives_ij.
    """
    logits_i2t = (logit_scale * img @ txt_all.t()).float()  # (B, G)
    logits_t2i = (logit_scale * txt @ img_all.t()).float()  # (B, G)
    if positives is None:
        labels = torch.arange(img.shape[0], device=img.device) + offset
    else:
        labels = positives.float() / positives.sum(1, keepdim=True)  # (B, G) rows sum to 1
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


@register_objective("itc")
class ImageTextContrastive(nn.Module):
    """Image-only and text-only passes; projections of the image [CLS] (hidden[:, 0]) and the text [CLS]
    (hidden[:, 0] of the text-only pass) to `itc_embed_dim`; symmetric InfoNCE, temperature learned as
    open_clip's log logit scale (clamped at 100). With `batch["image_id"]` (B,) every pair of the same
    image, on any rank, is a positive (module docstring).

    Leaves ``batch["context"]["itc"] = {"sim_i2t": (B, B), "sim_t2i": (B, B), "same_image": (B, B) bool}``
    (local pairs, detached; `same_image` only with image ids) for ITM's hard negatives.
    """

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        d, e = model_cfg.hidden_size, obj_cfg.itc_embed_dim
        self.image_proj = nn.Linear(d, e, bias=obj_cfg.itc_proj_bias)
        self.text_proj = nn.Linear(d, e, bias=obj_cfg.itc_proj_bias)
        self.eval_final_norm = obj_cfg.itc_eval_final_norm
        for m in (self.image_proj, self.text_proj):
            init_weights(m, model_cfg.init_std)
        # Shape (1,), not (): DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot take.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / obj_cfg.itc_init_temperature)))
        self.itm_negatives = obj_cfg.itm_negatives
        # The data-parallel group to gather over; None = the default (world) group. Set from outside.
        self.process_group: dist.ProcessGroup | None = None

    def embed_image(self, encoder: EVEModel, image: Tensor) -> tuple[Tensor, EncoderOutput]:
        """image: (B, C, S, S) -> (normalised features (B, E) float32, the image-only encoder output)."""
        enc = encoder(image=image)
        return F.normalize(self.image_proj(self._cls(enc)).float(), dim=-1), enc

    def embed_text(
        self, encoder: EVEModel, text_ids: Tensor, text_mask: Tensor
    ) -> tuple[Tensor, EncoderOutput]:
        """text_ids, text_mask: (B, L) -> (normalised features (B, E) float32, the text-only output)."""
        enc = encoder(text_ids=text_ids, text_mask=text_mask)
        return F.normalize(self.text_proj(self._cls(enc)).float(), dim=-1), enc

    def _cls(self, enc: EncoderOutput) -> Tensor:
        """(B, D) the pass's first output: after the final norm, or before it in evaluation with
        `objective.itc_eval_final_norm=false`."""
        if self.training or self.eval_final_norm:
            return enc.hidden[:, 0]
        return enc.pre_norm[:, 0]

    def features(self, encoder: EVEModel, batch: dict) -> tuple[Tensor, Tensor, list]:
        """-> (image features (B, E), text features (B, E), normalised; the two encoder outputs)."""
        img, enc_i = self.embed_image(encoder, batch["image"])
        txt, enc_t = self.embed_text(encoder, batch["text_ids"], batch["text_mask"])
        return img, txt, [enc_i, enc_t]

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        img, txt, calls = self.features(encoder, batch)
        img_all, offset = gather_features(img, self.process_group)
        txt_all, _ = gather_features(txt, self.process_group)
        ids = batch.get("image_id")
        positives = same = None
        if ids is not None:
            positives = ids[:, None] == gather_ids(ids, self.process_group)[None, :]  # (B, G)
            same = ids[:, None] == ids[None, :]  # (B, B) local
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp().squeeze(0)
        loss = info_nce(img, txt, img_all, txt_all, offset, scale, positives)
        with torch.no_grad():
            sim = scale * img @ txt.t()  # (B, B) local pairs
            best = sim.argmax(1)
            if same is None:
                acc = (best == torch.arange(sim.shape[0], device=sim.device)).float().mean()
            else:  # the best text of an image is right when it describes that image
                acc = same.gather(1, best[:, None]).float().mean()
        if "context" in batch:
            batch["context"]["itc"] = {"sim_i2t": sim, "sim_t2i": sim.t()}
            if same is not None:
                batch["context"]["itc"]["same_image"] = same
            if self.itm_negatives == "global":
                batch["context"]["itc"]["global"] = self._global_candidates(
                    scale, img, txt, img_all, txt_all, offset, positives
                )
        return {
            "itc_loss": loss,
            "itc_acc": acc,
            "itc_temperature": (1 / scale).detach(),
            "encoder_outputs": calls,
        }

    def _global_candidates(self, scale, img, txt, img_all, txt_all, offset, positives) -> dict:
        """ITM's candidates over the global batch: similarities (B, G) of the local rows to every rank's
        features, detached, and which of them are positives (same image id, or the pair itself)."""
        with torch.no_grad():
            if positives is None:
                positives = own_pairs(img.shape[0], img_all.shape[0], offset, img.device)
            return {
                "sim_i2t": scale * img @ txt_all.t(),
                # Written as the transpose of images x texts, as the local one is: bit-equal at world size 1.
                "sim_t2i": (scale * img_all @ txt.t()).t(),
                "positives": positives,
                "group": self.process_group,
            }


def sample_hard_negatives(
    sim: Tensor, generator: torch.Generator | None = None, positives: Tensor | None = None
) -> Tensor:
    """sim: (B, G) similarities of row i to candidate j (G = B for the local batch, the global batch's
    size for `itm_negatives=global`); positives: (B, G) bool, the candidates that match row i (default:
    j == i; with image ids, every caption of the same image). -> (B,) one index per row,
    drawn with probability ∝ softmax(sim[i]) among its non-positives (ALBEF); -1 for a row whose every
    candidate is a positive (the batch holds nothing else to contrast it with). Needs B >= 2."""
    if sim.shape[0] < 2:
        raise ValueError("ITM hard negatives need a local batch of at least 2 pairs")
    if positives is None:
        positives = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    has_negative = ~positives.all(1)  # (B,)
    # Softmax over the negatives only: the same proportions as ALBEF's softmax with the positives zeroed,
    # and a row never sums to zero (its largest negative gets weight > 0 even if the positive dominates).
    # A row without negatives gets uniform weights so that multinomial accepts it; its draw is discarded.
    logits = sim.float().masked_fill(positives, float("-inf"))
    logits = logits.masked_fill(~has_negative[:, None], 0.0)
    picks = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return picks.masked_fill(~has_negative, -1)


@register_objective("itm")
class ImageTextMatching(nn.Module):
    """One fusion pass over up to 3B pairs: B positives, B (image, hard-negative text), B (hard-negative
    image, text); 2-way classifier on the text [CLS] output (hidden[:, n_image]). Requires ITC before it.
    With image ids, a negative is never a pair of the same image; a row with no other image among the
    candidates (the local or the global batch, `objective.itm_negatives`) contributes its positive only."""

    requires = ("itc",)

    def __init__(self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.head = nn.Linear(model_cfg.hidden_size, 2)
        trunc_normal_(self.head.weight, std=model_cfg.init_std)
        nn.init.zeros_(self.head.bias)
        self.rerank_score = obj_cfg.itm_rerank_score

    def logits(
        self, encoder: EVEModel, image: Tensor, text_ids: Tensor, text_mask: Tensor
    ) -> tuple[Tensor, EncoderOutput]:
        """Fusion pass of the pairs (image (P, C, S, S), text (P, L)) -> (logits (P, 2) float32 [no match,
        match], the encoder output)."""
        enc = encoder(image, text_ids, text_mask)
        return self.head(enc.hidden[:, enc.n_image]).float(), enc

    def match_score(self, encoder: EVEModel, image: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """-> (P,) what retrieval re-ranks by (`objective.itm_rerank_score`): log_odds, logit[1] - logit[0]
        (the order of the match probability, without its saturation at 1), or match_logit, logit[1]."""
        logits, _ = self.logits(encoder, image, text_ids, text_mask)
        if self.rerank_score == "match_logit":
            return logits[:, 1]
        return logits[:, 1] - logits[:, 0]

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        itc = batch.get("context", {}).get("itc")
        if itc is None:
            raise RuntimeError("itm reads ITC's similarities: list itc before itm in objective.objectives")
        image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        same, has_ids = itc.get("same_image"), "same_image" in itc
        sim_i2t, sim_t2i, cand = itc["sim_i2t"], itc["sim_t2i"], (image, ids, mask)
        if "global" in itc:  # candidates from every rank: their inputs gathered, without gradient
            g = itc["global"]
            sim_i2t, sim_t2i, same = g["sim_i2t"], g["sim_t2i"], g["positives"]
            cand = tuple(gather_ids(x, g["group"]) for x in cand)
        neg_text = sample_hard_negatives(sim_i2t, generator, same)  # (B,) a text for each image
        neg_image = sample_hard_negatives(sim_t2i, generator, same)  # (B,) an image for each text
        t, i = neg_text >= 0, neg_image >= 0  # the rows that have a negative
        if not has_ids:  # all of them; a boolean index would make the GPU wait for its count
            t = i = slice(None)
        logits, enc = self.logits(
            encoder,
            torch.cat([image, image[t], cand[0][neg_image[i]]]),
            torch.cat([ids, cand[1][neg_text[t]], ids[i]]),
            torch.cat([mask, cand[2][neg_text[t]], mask[i]]),
        )  # (B + n_t + n_i, 2)
        n_neg = logits.shape[0] - image.shape[0]
        labels = torch.cat([torch.ones(image.shape[0]), torch.zeros(n_neg)]).long().to(logits.device)
        return {
            "itm_loss": F.cross_entropy(logits, labels),
            "itm_acc": (logits.argmax(1) == labels).float().mean().detach(),
            "encoder_outputs": [enc],
        }
