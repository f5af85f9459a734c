"""The `evlm_packed` task: EVLM trained with `caption_lm` on packed rows, the data of every full-scale stage.

Training: the packed corpora of `data.train` through `data/packed.py:build_packed_loader` (1 slot = 1 row
of the exactly resumable stream), read with the tokenizer of `model.lm_path` (else `data.tokenizer`). Every
corpus's manifest must name that tokenizer (the sha256 of its files) and `model.num_media_tokens`: shards
packed with another one would give other ids, so the run refuses them at start.

Validation (teacher-forced, every row of the held-out shards `data.val` once): the caption loss and token
accuracy, each again with the images rolled by one across the batch (`*_blind`): what the images add is
the gap between the two. Without `data.val` there is no validation.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from eve_ds.data.packed import RowReader, build_packed_loader, build_packed_val_loader, trainer_batch
from eve_ds.data.packed_shards import fingerprint_problems, tokenizer_record
from eve_ds.data.pipeline import load_tokenizer
from eve_ds.data.transforms import batch_to_device
from eve_ds.objectives.caption_lm import next_token_targets
from eve_ds.tasks.base import Task, TaskDataError, register_task
from eve_ds.utils.ranks import rank_and_world

METRICS = ("caption_lm_loss", "caption_lm_tok_acc")


class TrainerBatches:
    """The packed loader's batches under the trainer's keys (`trainer_batch`), with its layout and size."""

    def __init__(self, loader) -> None:
        self.loader, self.layout, self.num_samples = loader, loader.layout, loader.num_samples

    def __iter__(self):
        # iter() now, not at the first next(): it draws from torch's RNG (the exact-resume contract).
        batches = iter(self.loader)
        return ({**trainer_batch(b), "num_skipped": b["num_skipped"]} for b in batches)


@register_task("evlm_packed")
class EVLMPackedTask(Task):
    objectives = ("caption_lm",)
    metric = "caption_lm_loss"

    def prepare(self) -> None:
        """The LM's tokenizer, checked against every corpus's manifest; the row reader."""
        from eve_ds.models.evlm.model import media_token_id  # transformers: only runs of this task

        m, d = self.ctx.model, self.ctx.data
        if not d.train:
            raise TaskDataError(
                "data.train is empty; list the packed shard directories made by eve-make-shards"
            )
        path = m.lm_path or d.tokenizer
        self.tokenizer = load_tokenizer(path)
        own = tokenizer_record(path, self.tokenizer)
        where = f"{'model.lm_path' if m.lm_path else 'data.tokenizer'}={path!r}"
        specs = [(f"data.train[{c.name}].shards", c.shards) for c in d.train]
        specs += [("data.val", d.val)] if d.val else []
        problems = [p for k, s in specs for p in fingerprint_problems(k, s, own, m.num_media_tokens, where)]
        if problems:
            raise TaskDataError(problems[0])
        self.reader = RowReader(self.tokenizer, media_token_id(m), m.num_media_tokens, m.image_size)

    def num_examples(self) -> None:
        return None  # rows are counted when the loader opens the manifests; train.max_steps is required

    def train_loader(
        self,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        start_batch: int,
        saved_layout: dict | None = None,
    ) -> TrainerBatches:
        loader = build_packed_loader(
            self.ctx.data, self.reader, batch_size=batch_size, rank=rank, world_size=world_size,
            seed=self.ctx.seed, start_batch=start_batch, saved_layout=saved_layout,
        )  # fmt: skip
        return TrainerBatches(loader)

    def data_layout(self, loader: TrainerBatches) -> dict:
        return loader.layout

    def epoch_samples(self, loader: TrainerBatches) -> int:
        return loader.num_samples

    def evaluate(self, model, split: str, *, device: str, dtype: torch.dtype, batch_size: int) -> dict:
        """The held-out rows of `data.val` ({} without it; `split` is not used: the shards are the split)."""
        if not self.ctx.data.val:
            return {}
        return self.score(model, self.ctx.data.val, device=device, dtype=dtype, batch_size=batch_size)

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
        """Teacher-forced metrics over the rows of the shards `split` (a directory or brace spec), with the
        images and with them rolled across each batch; `train.eval_batches` per rank at most."""
        rank, world = rank_and_world()
        loader = build_packed_val_loader(
            split, self.reader, batch_size=batch_size, rank=rank, world_size=world
        )
        was_training = model.training
        model.eval()
        # fork_rng: opening the loader draws from torch's RNG, which a resumed run must find unmoved.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            sums = self._sum_batches(model.encoder, loader, device, dtype)
        model.train(was_training)
        return finish(sums, device)

    def _sum_batches(self, backbone, loader, device: str, dtype: torch.dtype) -> dict:
        """Sums over this rank's batches. Every rank runs as many forwards as the rank with the most
        batches (an expert-parallel MoE exchanges tokens in each): one that has run out repeats its last
        batch, uncounted."""
        sums: dict[str, float] = defaultdict(float)
        batches, last, i = iter(loader), None, 0
        while not self.ctx.eval_batches or i < self.ctx.eval_batches:
            batch = next(batches, None)
            if not any_rank(batch is not None, device):
                break
            counted = batch is not None
            batch = batch if counted else last
            last, i = batch, i + 1
            if batch is None:  # fewer rows than ranks: nothing to repeat
                continue
            x = batch_to_device(trainer_batch(batch), device, dtype, self.ctx.image_mean, self.ctx.image_std)
            for suffix, images in (("", x["image"]), ("_blind", x["image"].roll(1, 0))):
                add_sums(sums if counted else defaultdict(float), backbone, {**x, "images": images}, suffix)
            sums["rows"] += len(batch["key"]) if counted else 0
        return sums


def any_rank(flag: bool, device: str) -> bool:
    """Whether `flag` holds on any rank (collective when distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def add_sums(sums: dict, backbone, batch: dict, suffix: str) -> None:
    """Add one batch's summed loss and hits over its labelled tokens to `sums`."""
    targets = next_token_targets(batch["labels"], batch["position_ids"])
    keep = targets != -100
    logits = backbone(batch).logits[:, :-1][keep].float()  # (T, V)
    target = targets[keep]
    sums["tokens" + suffix] += target.numel()
    sums["caption_lm_loss" + suffix] += float(F.cross_entropy(logits, target, reduction="sum"))
    sums["caption_lm_tok_acc" + suffix] += int((logits.argmax(-1) == target).sum())


def finish(sums: dict, device: str) -> dict:
    """Sums of every rank -> means per labelled token, and the number of rows."""
    keys = ["rows", *(f"{m}{s}" for m in ("tokens", *METRICS) for s in ("", "_blind"))]
    totals = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    out = {f"{m}{s}": t[f"{m}{s}"] / max(1.0, t["tokens" + s]) for m in METRICS for s in ("", "_blind")}
    return {**out, "num_samples": int(t["rows"])}
