"""NLVR2 as a task of the shared trainer: the official files (`data`), accuracy on dev / test-P (`test1`,
metric in `eval`), and the `nlvr2` objective (two fusion passes and the bi-attention or concat head).

Unreadable images: a training pair with a missing image is skipped at read time and one that cannot be
decoded is skipped by the collate (both counted); in evaluation either is an error unless
`task.skip_bad_eval_images`, because an accuracy over a silently shrunken split cannot be compared.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch.utils.data import DataLoader, Subset

from eve_ds.tasks.base import Task, TaskContext, register_task
from eve_ds.tasks.nlvr2.data import NLVR2DataError, NLVR2Dataset, NLVR2Example, nlvr2_collate, read_nlvr2
from eve_ds.tasks.nlvr2.eval import accuracy, template_accuracy, write_predictions
from eve_ds.tasks.nlvr2.synthetic import ensure_synthetic_nlvr2
from eve_ds.utils.image import normalize_image
from eve_ds.utils.ranks import even_rank_slice, gather_objects

log = logging.getLogger(__name__)


@register_task("nlvr2")
class NLVR2Task(Task):
    objectives = ("nlvr2",)
    metric = "nlvr2_acc"
    official_text = ("caption", 40, 40)  # [official code] pre_caption, max words

    def make_synthetic(
        self, cache_dir: str, *, seed: int, counts: tuple[int, int, int], image_size: int
    ) -> str:
        num_train, num_dev, num_test = counts
        return ensure_synthetic_nlvr2(
            cache_dir,
            seed=seed,
            num_train=num_train,
            num_dev=num_dev,
            num_test=num_test,
            image_size=image_size,
        )

    def prepare(self) -> None:
        root = self.root()
        self.train_examples, self.counts = read_nlvr2(root, "train")
        if not self.train_examples:
            raise NLVR2DataError(f"{root}/train.json: no training example has both images ({self.counts})")
        log.info("NLVR2 from %s: %s (pairs with a missing image are skipped)", root, self.counts)

    def objective_options(self) -> dict:
        return {"nlvr2": {"head": self.cfg.nlvr2_head}}

    def train_dataset(self):
        ds = NLVR2Dataset(
            self.train_examples,
            self.ctx.image_size,
            **self.train_image_options(),
        )
        return ds, functools.partial(
            nlvr2_collate, tokenizer=self.tokenizer(train=True), max_text_len=self.ctx.max_text_len
        )

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
        """{"nlvr2_acc", "num_examples" (scored), "num_skipped"}, and `nlvr2_acc/<template>` on the
        synthetic set; `predictions`: write NLVR2's prediction file (identifier,True|False lines)."""
        root, skip = self.root(), self.cfg.skip_bad_eval_images
        examples, counts = read_nlvr2(root, split, skip_missing=skip)
        preds = predict(
            model,
            examples,
            self.eval_context(),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            geometry=self.cfg.image_geometry,
        )
        unreadable = [e for e in examples if preds[e.identifier] is None]
        if unreadable and not skip:
            e = unreadable[0]
            raise NLVR2DataError(
                f"NLVR2 {split}: {len(unreadable)} example(s) with an image that cannot be decoded, e.g. "
                f"{e.identifier!r} ({e.left_path}, {e.right_path}); set task.skip_bad_eval_images=true "
                "(eve-evaluate --skip-bad-images) to skip them"
            )
        scored = [e for e in examples if preds[e.identifier] is not None]
        metrics = {
            "nlvr2_acc": accuracy(scored, preds),
            "num_examples": len(scored),
            "num_skipped": counts["missing_image"] + len(unreadable),
        }
        metrics.update(template_accuracy(root, split, scored, preds))
        if predictions:
            write_predictions(predictions, scored, preds)
            metrics["predictions"] = os.path.abspath(predictions)
        return metrics


@torch.no_grad()
def predict(
    model,
    examples: list[NLVR2Example],
    ctx: TaskContext,
    *,
    device: str,
    dtype: torch.dtype,
    batch_size: int,
    geometry: str = "square_crop",
) -> dict[str, int | None]:
    """{identifier: 1 (True) | 0 (False), or None when an image could not be decoded}, over every rank;
    images read with task.image_geometry `geometry`."""
    was_training = model.training
    model.eval()
    # Padded so that every rank makes the same number of passes (expert parallelism: each MoE pass is
    # collective); a repeated statement gives the same prediction.
    mine = even_rank_slice(len(examples))
    dataset = Subset(NLVR2Dataset(examples, ctx.image_size, train=False, geometry=geometry), mine)
    collate = functools.partial(nlvr2_collate, tokenizer=ctx.tokenizer, max_text_len=ctx.max_text_len)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=ctx.num_workers)
    preds: dict[str, int | None] = {examples[i].identifier: None for i in mine}  # None until scored
    for batch in loader:
        if batch is None:  # every item of the batch was unreadable
            continue
        inputs = {
            "image": normalize_image(
                batch["image"].to(device), dtype, ctx.image_mean, ctx.image_std
            ),  # (B, 2, 3, S, S)
            "text_ids": batch["text_ids"].to(device),
            "text_mask": batch["text_mask"].to(device),
        }
        logits = model(inputs)["nlvr2_logits"]
        preds.update(zip(batch["identifier"], logits.argmax(1).tolist()))
    model.train(was_training)
    merged: dict[str, int | None] = {}
    for part in gather_objects(preds):
        merged.update(part)
    return merged
