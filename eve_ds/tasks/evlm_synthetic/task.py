"""The `evlm_synthetic` task: EVLM's pre-training on synthetic scenes (captions, VQA, POPE), on the shared
trainer.

Training: `caption_lm` on the rows of `data.py`, in the order of the Task base's `EpochBatchSampler`
(exactly resumable by batch count); text-only rows when the model is in stage 0 (`train/stages.py`).
Validation, over the val scenes, each metric again with the images rolled by one (`*_blind`), so that
what the images add is the gap between the two:
- teacher-forced: caption-row loss, token accuracy, accuracy on colour words;
- generated (greedy, KV cache; `eval.py`): CIDEr-D, BLEU-4, object F1, VQA exact match per template
  (`vqa_colour`, ...), POPE accuracy / F1 / yes-ratio, overall and per sampler; with the opt-in kinds
  (`task.synthetic_extra_kinds`) grounding accuracy / IoU, the interleaved second caption's object F1 and
  video direction accuracy, the last two also with the images reversed within the prompt. Not in stage 0.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from eve_ds.data.synthetic import COLOURS
from eve_ds.data.transforms import batch_to_device
from eve_ds.objectives.caption_lm import next_token_targets
from eve_ds.tasks.base import Task, register_task
from eve_ds.tasks.evlm_synthetic.data import (
    MEDIA,
    VIDEO_FRAMES,
    VOCAB,
    CaptionScenes,
    collate,
    ensure_tokenizer,
)
from eve_ds.tasks.evlm_synthetic.eval import (
    ExtraImages,
    decode,
    eval_rng,
    extra_metrics,
    extra_prompts,
    generation_metrics,
    references,
    scene_prompts,
    tower_features,
)
from eve_ds.utils.image import normalize_image
from eve_ds.utils.ranks import even_rank_slice, rank_slice

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
        model = self.ctx.model
        return CaptionScenes(
            n, split, c.synthetic_seed, self.ctx.image_size, self.tokenizer, media_tokens,
            text_only=model is not None and model.stage == "stage0", extra_kinds=c.synthetic_extra_kinds,
        )  # fmt: skip

    def num_examples(self) -> int:
        return self.cfg.synthetic_num_train

    def train_dataset(self):
        return self.dataset("train"), functools.partial(collate, image_size=self.ctx.image_size)

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
        """The metrics of the scenes of `split` (this rank's share, `train.eval_batches` batches per rank
        at most), with the images and with them rolled (module doc)."""
        if "tokenizer" not in vars(self):  # `eve-evaluate` of another split than the run's: not prepared
            self.prepare()
        dataset = self.dataset(split)
        mine = even_rank_slice(len(dataset))
        # The wrapped-around repeats at the end run (every rank makes as many forwards) but do not count.
        counted = len(rank_slice(len(dataset)))
        if self.ctx.eval_batches:
            mine = mine[: self.ctx.eval_batches * batch_size]
        counted = min(counted, len(mine))
        items = [dataset[i] for i in mine]
        was_training = model.training
        model.eval()
        out = self.teacher_forced(model.encoder, items, device, dtype, batch_size, counted)
        if dataset.text_only:
            model.train(was_training)
            return {**out, "num_samples": len(dataset)}
        out |= self.generated(model.encoder, items, mine, dataset, device, dtype, counted)
        model.train(was_training)
        return {**out, "num_samples": len(dataset)}

    def teacher_forced(
        self, backbone, items: list[dict], device, dtype, batch_size: int, counted: int | None = None
    ) -> dict:
        """Summed over items[:counted] (all: None); the rest are run, their labels ignored."""
        colour_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(COLOURS)), device=device)
        sums: dict[str, float] = defaultdict(float)
        size = self.ctx.image_size
        counted = len(items) if counted is None else counted
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                batch = collate(items[start : start + batch_size], image_size=size)
                batch = batch_to_device(batch, device, dtype, self.ctx.image_mean, self.ctx.image_std)
                repeats = torch.arange(start, start + batch["labels"].shape[0], device=device) >= counted
                batch["labels"] = batch["labels"].masked_fill(repeats[:, None], -100)
                for suffix, images in (("", batch["image"]), ("_blind", batch["image"].roll(1, 0))):
                    add_sums(sums, backbone, {**batch, "images": images}, colour_ids, suffix)
        return finish(sums, device)

    def generated(
        self,
        backbone,
        items: list[dict],
        indices: list[int],
        dataset: CaptionScenes,
        device,
        dtype,
        counted: int | None = None,
    ) -> dict:
        """Greedy answers and captions of the scenes of `dataset` at `indices` (`items`), with their images and
        with the previous scene's; the scenes from `counted` on are decoded (equal forwards on every rank)
        but left out of the metrics."""
        seed, split = self.cfg.synthetic_seed, dataset.split
        scenes = [it["scene"] for it in items]
        n, size = len(items), self.ctx.image_size
        kinds = sorted(dataset.extra_kinds)
        where = ExtraImages(n, "interleaved" in kinds, VIDEO_FRAMES if "video" in kinds else 0)
        pixels = [it["image"] for it in items]
        seconds, clips = [], []
        if "interleaved" in kinds:
            seconds = [dataset.second_scene(i) for i in indices]
            pixels += [torch.from_numpy(im).permute(2, 0, 1) for _, im in seconds]
        if "video" in kinds:
            clips = [dataset.clip(i) for i in indices]
            pixels += [torch.from_numpy(f).permute(2, 0, 1) for _, frames in clips for f in frames]
        prompts = []
        for k, (i, s) in enumerate(zip(indices, scenes)):
            prompts += scene_prompts(k, s, eval_rng(seed, split, i), seed)
            prompts += extra_prompts(
                k, s, kinds, size, where, seconds[k][0] if seconds else None, clips[k][0] if clips else None
            )
        refs = [references(s, eval_rng(seed, split, i)) for i, s in zip(indices, scenes)]
        images = normalize_image(
            torch.stack(pixels).to(device), dtype, self.ctx.image_mean, self.ctx.image_std
        )
        feats = tower_features(backbone, images, EVAL_BATCH)
        out = {}
        passes = (
            ("", lambda p: p.media or (p.scene,)),
            ("_blind", lambda p: [where.roll(j) for j in p.media or (p.scene,)]),
        )
        for suffix, images_of in passes:
            generated = decode(backbone, prompts, feats, images_of, EVAL_BATCH)
            m = generation_metrics(*gather_ranks(*counted_parts(prompts, generated, scenes, refs, counted)))
            out |= {k + suffix: v for k, v in m.items()}
        # The images of a multi-image prompt in reverse order: the interleaved second caption reads the first
        # image (rolled within the row), the clip plays backwards.
        multi = [p for p in prompts if len(p.media) > 1]
        if multi:
            generated = decode(backbone, multi, feats, lambda p: p.media[::-1], EVAL_BATCH)
            parts = gather_ranks(*counted_parts(multi, generated, scenes, refs, counted))
            out |= extra_metrics(parts[0], parts[1], reversed_images=True)
        return out


def counted_parts(prompts: list, generated: list, scenes: list, refs: list, counted: int | None):
    """The prompts of the first `counted` scenes (all: None), their generations, scenes and references."""
    if counted is None or counted >= len(scenes):
        return prompts, generated, scenes, refs
    keep = [j for j, p in enumerate(prompts) if p.scene < counted]
    return [prompts[j] for j in keep], [generated[j] for j in keep], scenes[:counted], refs[:counted]


def gather_ranks(prompts: list, generated: list, scenes: list, refs: list) -> tuple[list, list, list, list]:
    """Every rank's prompts, generations, scenes and references, as one set (CIDEr is a corpus metric);
    the prompts' scene positions shifted to index the joined scenes. One process: as they are."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return prompts, generated, scenes, refs
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (prompts, generated, scenes, refs))
    out: tuple[list, list, list, list] = ([], [], [], [])
    for p, g, s, r in parts:
        out[0].extend(dataclasses.replace(x, scene=x.scene + len(out[2])) for x in p)
        out[1].extend(g)
        out[2].extend(s)
        out[3].extend(r)
    return out


# Rows decoded together: prompts are short (<= 30 tokens), so a large batch costs little memory.
EVAL_BATCH = 256


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


def finish(sums: dict, device: str) -> dict:
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
    return out
