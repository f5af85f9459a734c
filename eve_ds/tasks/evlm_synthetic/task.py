"""The `evlm_synthetic` task: EVLM's caption pre-training on synthetic scenes, on the shared trainer.

Training: `caption_lm` on the rows of `data.py`, in the order of the Task base's `EpochBatchSampler`
(exactly resumable by batch count). Validation (teacher-forced, over the val scenes): caption loss, token
accuracy and the accuracy on colour words, each again with the images rolled by one across the batch
(`*_blind`): what the images add is the gap between the two.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from eve_ds.data.synthetic import COLOURS
from eve_ds.data.transforms import batch_to_device
from eve_ds.objectives.caption_lm import next_token_targets
from eve_ds.tasks.base import Task, register_task
from eve_ds.tasks.evlm_synthetic.data import MEDIA, VOCAB, CaptionScenes, collate, ensure_tokenizer
from eve_ds.utils.ranks import even_rank_slice

METRICS = ("caption_lm_loss", "caption_lm_tok_acc", "colour_word_acc")


@register_task("evlm_synthetic")
class EVLMSyntheticTask(Task):
    objectives = ("caption_lm",)
    metric = "caption_lm_loss"

    def prepare(self) -> None:
        """The vocabulary's tokenizer (written by rank 0 on first use), checked against the model config."""
        self.tokenizer = ensure_tokenizer(os.path.join(self.ctx.cache_dir, "evlm_synthetic", "tokenizer"))
        model = self.ctx.model
        if model is None:
            return
        media = self.tokenizer.convert_tokens_to_ids(MEDIA)
        if model.media_token_id not in (-1, media):
            raise ValueError(
                f"model.media_token_id={model.media_token_id}: the task's vocabulary has {media}"
            )
        if len(VOCAB) > model.lm_layout["vocab_size"]:
            raise ValueError(
                f"model.lm_layout.vocab_size={model.lm_layout['vocab_size']} is smaller than the task's "
                f"vocabulary ({len(VOCAB)} words)"
            )

    def dataset(self, split: str) -> CaptionScenes:
        c = self.cfg
        n = c.synthetic_num_train if split == "train" else c.synthetic_num_val
        media_tokens = self.ctx.model.num_media_tokens if self.ctx.model is not None else 16
        return CaptionScenes(n, split, c.synthetic_seed, self.ctx.image_size, self.tokenizer, media_tokens)

    def num_examples(self) -> int:
        return self.cfg.synthetic_num_train

    def train_dataset(self):
        return self.dataset("train"), collate

    def score(
        self,
        model,
        split: str,
        *,
        device: str,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        predictions: str | None = None,
    ) -> dict:
        """Teacher-forced metrics over the scenes of `split` (this rank's share, `train.eval_batches` per
        rank at most), with the images and with them rolled across each batch."""
        dataset = self.dataset(split)
        mine = even_rank_slice(len(dataset))
        batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        if self.ctx.eval_batches:
            batches = batches[: self.ctx.eval_batches]
        colour_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(COLOURS)), device=device)
        was_training = model.training
        model.eval()
        sums: dict[str, float] = defaultdict(float)
        with torch.no_grad():
            for idx in batches:
                batch = collate([dataset[i] for i in idx])
                batch = batch_to_device(batch, device, dtype, self.ctx.image_mean, self.ctx.image_std)
                for suffix, images in (("", batch["image"]), ("_blind", batch["image"].roll(1, 0))):
                    add_sums(sums, model.encoder, {**batch, "images": images}, colour_ids, suffix)
        model.train(was_training)
        return finish(sums, device, len(dataset))


def add_sums(sums: dict, backbone, batch: dict, colour_ids: torch.Tensor, suffix: str) -> None:
    """Add one batch's summed loss and hit counts (all labelled tokens, colour words) to `sums`."""
    targets = next_token_targets(batch["labels"], batch["position_ids"])
    keep = targets != -100
    logits = backbone(batch).logits[:, :-1][keep].float()  # (T, V)
    target = targets[keep]
    hit = logits.argmax(-1) == target
    colour = torch.isin(target, colour_ids)
    sums["tokens"] += target.numel()
    sums["colours"] += int(colour.sum())
    sums["caption_lm_loss" + suffix] += float(F.cross_entropy(logits, target, reduction="sum"))
    sums["caption_lm_tok_acc" + suffix] += int(hit.sum())
    sums["colour_word_acc" + suffix] += int(hit[colour].sum())


def finish(sums: dict, device: str, num_samples: int) -> dict:
    """Sums of every rank -> means per labelled token (per colour word for colour_word_acc)."""
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    # Each batch is run twice (with and without its images): both runs counted the tokens.
    tokens, colours = t["tokens"] / 2, t["colours"] / 2
    out = {}
    for name in METRICS:
        for suffix in ("", "_blind"):
            out[name + suffix] = t[name + suffix] / max(1.0, colours if name == "colour_word_acc" else tokens)
    return {**out, "num_samples": num_samples}
