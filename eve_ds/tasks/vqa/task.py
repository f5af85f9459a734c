"""VQA v2 as a task of the shared trainer: the official files (`data`), the official accuracy (`eval`), the
`vqa` objective, and the EvalAI submission file."""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch.utils.data import DataLoader, Subset

from eve_ds.tasks.base import Task, register_task
from eve_ds.tasks.vqa.data import AnswerVocab, VQADataError, VQADataset, read_vqa, split_minival, vqa_collate
from eve_ds.tasks.vqa.eval import score_predictions, write_results
from eve_ds.tasks.vqa.synthetic import ensure_synthetic_vqa
from eve_ds.utils.image import normalize_image
from eve_ds.utils.ranks import even_rank_slice, gather_objects

log = logging.getLogger(__name__)

TEST_SPLITS = ("test-dev", "test")


@register_task("vqa")
class VQATask(Task):
    objectives = ("vqa",)
    metric = "vqa_score"
    official_text = ("question", 30, 50)  # [official code] pre_question, max words

    def make_synthetic(
        self, cache_dir: str, *, seed: int, counts: tuple[int, int, int], image_size: int
    ) -> str:
        num_train, num_val, num_test = counts
        return ensure_synthetic_vqa(
            cache_dir,
            seed=seed,
            num_train_images=num_train,
            num_val_images=num_val,
            num_test_images=num_test,
            image_size=image_size,
        )

    def prepare(self) -> None:
        """Train split (train + val minus minival by default), the minival, and the answer vocabulary."""
        root = self.root()
        c = self.cfg
        val, counts = read_vqa(root, "val", skip_missing=True)
        rest, self.minival = split_minival(val, c.minival_images, seed=0)
        parts = {"val": rest}
        for split in c.vqa_train_splits or ["train", "val"]:
            if split != "val":
                parts[split], more = read_vqa(root, split, skip_missing=True)
                counts = {k: counts.get(k, 0) + more.get(k, 0) for k in {*counts, *more}}
        if c.vqa_train_splits is not None and "val" not in c.vqa_train_splits:
            parts.pop("val")
        self.train_examples = [e for part in parts.values() for e in part]
        self.vocab = AnswerVocab.build(self.train_examples, size=c.answer_vocab_size)
        self.counts = counts
        log.info(
            "VQA v2 from %s: %d training questions (%s), %d minival, %d answers; %s",
            root,
            len(self.train_examples),
            "+".join(parts),
            len(self.minival),
            len(self.vocab),
            counts,
        )

    def objective_options(self) -> dict:
        return {"vqa": {"num_answers": len(self.vocab)}}

    def assets(self) -> dict:
        return {"answer_vocab": self.vocab.to_json()}

    def train_dataset(self):
        ds = VQADataset(
            self.train_examples,
            self.vocab,
            self.ctx.image_size,
            **self.train_image_options(),
        )
        return ds, functools.partial(
            vqa_collate, tokenizer=self.tokenizer(train=True), max_text_len=self.ctx.max_text_len
        )

    takes_init_assets = True

    def take_init_assets(self, saved: dict, source: str) -> None:
        """Initial weights with a VQA head keep its answers in its order: their answer vocabulary replaces
        the one built from the data (task.answer_vocab_size is then not read)."""
        head = ((saved.get("objective") or {}).get("heads") or {}).get("vqa")
        if head is None:
            return
        rows, listed = head.get("num_answers"), (saved.get("task") or {}).get("answer_vocab")
        if listed is None:
            if rows != len(self.vocab):
                raise VQADataError(
                    f"train.init_from={source}: its VQA head has {rows} answers and no answer list, the run "
                    f"{len(self.vocab)} (task.answer_vocab_size); import it with eve-convert import-official "
                    "--answer-list FILE, or start from a checkpoint without a VQA head"
                )
            log.warning(
                "train.init_from=%s: its VQA head has no answer list; the run's order is assumed", source
            )
            return
        vocab = AnswerVocab.from_json(listed)
        if len(vocab) != rows:
            raise VQADataError(
                f"train.init_from={source}: its answer list has {len(vocab)} answers but its VQA head "
                f"{rows} rows (objective.heads.vqa.num_answers); the list must name every row of the head"
            )
        log.info("VQA answers: the %d of %s, in its order (task.answer_vocab_size not used)", rows, source)
        self.vocab = vocab

    def load_assets(self, assets: dict) -> None:
        if "answer_vocab" not in assets:
            raise VQADataError(
                "the checkpoint has no VQA answer vocabulary: it was not fine-tuned with task.name=vqa"
            )
        self.vocab = AnswerVocab.from_json(assets["answer_vocab"])

    def read_minival(self):
        """The val questions held out of training (`task.minival_images`), as `prepare` holds them out."""
        val, _ = read_vqa(self.root(), "val", skip_missing=True)
        return split_minival(val, self.cfg.minival_images, seed=0)[1]

    def read(self, split: str) -> tuple[list, int]:
        """(questions, how many were left out): every question of a split, but those whose image is
        missing with `task.skip_bad_eval_images`; for test splits also those (they still need an answer in
        the submission file)."""
        skip = self.cfg.skip_bad_eval_images
        test = split in TEST_SPLITS
        examples, counts = read_vqa(self.root(), split, skip_missing=skip and not test, missing_ok=test)
        return examples, 0 if test else counts["missing_image"]

    def evaluate(self, model, split: str, *, device: str, dtype: torch.dtype, batch_size: int) -> dict:
        examples, left_out = (self.minival, 0) if split == "minival" else self.read(split)
        metrics = self.score(model, examples, split, device=device, dtype=dtype, batch_size=batch_size)
        return self.count_missing(metrics, left_out)

    def evaluate_split(
        self, model, split: str, *, device: str, batch_size: int, predictions: str | None = None
    ) -> dict:
        examples, left_out = (self.read_minival(), 0) if split == "minival" else self.read(split)
        metrics = self.score(
            model, examples, split, device=device, batch_size=batch_size, predictions=predictions
        )
        return self.count_missing(metrics, left_out)

    @staticmethod
    def count_missing(metrics: dict, left_out: int) -> dict:
        """`num_missing`: the questions without a prediction, those left out for a missing image included
        (the score is over the rest)."""
        if left_out:
            log.warning("%d question(s) left out: their image file is missing", left_out)
        if "vqa_score" in metrics:
            metrics["num_missing"] = metrics.get("num_missing", 0) + left_out
        return metrics

    def score(
        self,
        model,
        examples,
        split: str,
        *,
        device: str,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        predictions: str | None = None,
    ) -> dict:
        preds = predict(
            model,
            examples,
            self.vocab,
            self.eval_context(),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            geometry=self.cfg.image_geometry,
        )
        metrics = {"num_questions": len(examples)}
        if predictions:  # EvalAI rejects a file without every question: unreadable ones get the top answer
            fallback = self.vocab.answer(0)
            n = write_results(
                predictions,
                {q: a for q, a in preds.items() if a},
                [e.question_id for e in examples],
                fallback,
            )
            if n:
                log.warning(
                    "%d question(s) without a readable image were answered %r in %s", n, fallback, predictions
                )
            metrics["predictions"] = os.path.abspath(predictions)
        answered = {q: a for q, a in preds.items() if a is not None}
        metrics["num_unreadable"] = len(examples) - len(answered)
        if split not in TEST_SPLITS:
            metrics.update(score_predictions(answered, [e for e in examples if e.question_id in answered]))
        return metrics


@torch.no_grad()
def predict(
    model,
    examples,
    vocab: AnswerVocab,
    ctx,
    *,
    device: str,
    dtype: torch.dtype,
    batch_size: int,
    geometry: str = "square_crop",
) -> dict:
    """{question_id: answer string, or None when its image could not be read}, over every rank; images
    read with task.image_geometry `geometry`."""
    was_training = model.training
    model.eval()
    images = VQADataset(examples, vocab, ctx.image_size, train=False, geometry=geometry)
    dataset = Subset(images, even_rank_slice(len(examples)))
    collate = functools.partial(vqa_collate, tokenizer=ctx.tokenizer, max_text_len=ctx.max_text_len)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=ctx.num_workers)
    preds: dict[int, str | None] = {}
    for batch in loader:
        if batch is None:
            continue
        for qid in batch.get("skipped_question_ids", []):
            preds[qid] = None
        if not batch["question_id"]:
            continue
        inputs = {
            "image": normalize_image(batch["image"].to(device), dtype, ctx.image_mean, ctx.image_std),
            "text_ids": batch["text_ids"].to(device),
            "text_mask": batch["text_mask"].to(device),
        }
        logits = model(inputs)["vqa_logits"]
        for qid, i in zip(batch["question_id"], logits.argmax(1).tolist()):
            preds[qid] = vocab.answer(i)
    model.train(was_training)
    merged: dict[int, str | None] = {}
    for part in gather_objects(preds):
        merged.update(part)
    return merged
