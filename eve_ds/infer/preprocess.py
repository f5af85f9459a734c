"""Evaluation's own preprocessing, for single inputs: the one module of `eve_ds.infer` that imports the
task modules, so that predictions on one's own images go through exactly the code `eve-evaluate` runs
(decoding and centre-square resize, tokenizer, collates, the retrieval evaluation's two stages).

Images are paths or PIL images. The tasks' datasets read files, so a PIL image is written losslessly
(PNG) into a temporary folder for the duration of a call: the pixels the model sees are those of the
PIL image, resized by the same `load_image` as a file would be.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from eve_ds.data import load_tokenizer
from eve_ds.tasks.base import TaskContext, build_task, load_image, task_text_rule
from eve_ds.tasks.config import TaskConfig
from eve_ds.tasks.nlvr2.data import NLVR2Dataset, NLVR2Example, nlvr2_collate
from eve_ds.tasks.retrieval.data import RetrievalImage
from eve_ds.tasks.retrieval.task import RetrievalScores, retrieval_scores
from eve_ds.tasks.vqa.data import AnswerVocab, VQADataset, VQAExample, vqa_collate

__all__ = [
    "AnswerVocab",
    "ImageInput",
    "RetrievalScores",
    "UnreadableImageError",
    "as_paths",
    "context",
    "load_pixels",
    "nlvr2_batch",
    "pair_batch",
    "retrieval_scores_of",
    "task_config",
    "vqa_batch",
]

ImageInput = str | os.PathLike | Image.Image
TEXT_TASKS = ("vqa", "retrieval", "nlvr2")  # the tasks whose texts `context` cleans by their rule


class UnreadableImageError(ValueError):
    """An input image that cannot be decoded; `names` says which."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        super().__init__(f"cannot read image {self.names[0]}{more}")


def image_name(image: ImageInput, i: int) -> str:
    return f"<PIL image {i}>" if isinstance(image, Image.Image) else os.fspath(image)


@contextlib.contextmanager
def as_paths(images: Sequence[ImageInput]) -> Iterator[list[str]]:
    """Paths of `images` (PIL images saved as PNG into a temporary folder while the context is open)."""
    with tempfile.TemporaryDirectory(prefix="eve-infer-") as tmp:
        paths = []
        for i, im in enumerate(images):
            if isinstance(im, Image.Image):
                path = os.path.join(tmp, f"{i}.png")
                (im if im.mode in ("RGB", "RGBA", "L", "LA", "P", "I", "1") else im.convert("RGB")).save(path)
                paths.append(path)
            else:
                paths.append(os.fspath(im))
        yield paths


def load_pixels(path: str, image_size: int, geometry: str = "square_crop") -> np.ndarray | None:
    """(S, S, 3) uint8 as evaluation decodes it (task.image_geometry `geometry`), None if unreadable."""
    return load_image(path, image_size, geometry)


def task_config(config: dict, name: str) -> TaskConfig:
    """The checkpoint's task section (its run config) as a TaskConfig for task `name`."""
    saved = ((config.get("run") or {}).get("task") or {}) | {"name": name, "synthetic": False}
    return TaskConfig(**{k: v for k, v in saved.items() if k in TaskConfig.__dataclass_fields__})


def hf_text_rule(config: dict) -> dict | None:
    """How the checkpoint's task cleaned its texts in evaluation (task.text_preprocess), for an HF export's
    config: {"kind": question | caption, "max_words": N}, or None (as they are; no task, or no rule)."""
    saved = (config.get("run") or {}).get("task") or {}
    if saved.get("text_preprocess", "none") == "none" or saved.get("name") not in TEXT_TASKS:
        return None
    rule = task_text_rule(task_config(config, saved["name"]), train=False)
    return None if rule.kind == "none" else {"kind": rule.kind, "max_words": rule.max_words}


def context(config: dict, model_cfg, task: str = "") -> TaskContext:
    """The TaskContext `eve-evaluate` builds for this checkpoint (tokenizer, image size, text length);
    for a downstream `task`, its tokenizer cleans the texts as that task's evaluation does
    (task.text_preprocess)."""
    data = (config.get("run") or {}).get("data") or {}
    ctx = TaskContext(
        tokenizer=load_tokenizer(data.get("tokenizer") or "bert-base-uncased"),
        cache_dir="",
        image_size=model_cfg.image_size,
        max_text_len=model_cfg.max_text_len,
        num_workers=0,
        image_mean=data.get("image_mean"),  # None: ImageNet's, as the run normalised
        image_std=data.get("image_std"),
    )
    if task in TEXT_TASKS:
        return build_task(task_config(config, task), ctx).eval_context()
    return ctx


def answer_vocab(config: dict, ctx: TaskContext) -> AnswerVocab:
    """The VQA answer vocabulary saved with the checkpoint, read back by the VQA task itself."""
    task = build_task(task_config(config, "vqa"), ctx)
    task.load_assets(config.get("task") or {})
    return task.vocab


def vqa_batch(
    paths: Sequence[str],
    questions: Sequence[str],
    vocab: AnswerVocab,
    ctx: TaskContext,
    geometry: str = "square_crop",
):
    """-> (vqa_collate's batch of the readable pairs or None, positions of the unreadable ones)."""
    examples = [VQAExample(i, i, p, " ".join(q.split())) for i, (p, q) in enumerate(zip(paths, questions))]
    dataset = VQADataset(examples, vocab, ctx.image_size, train=False, geometry=geometry)
    batch = vqa_collate(
        [dataset[i] for i in range(len(dataset))], ctx.tokenizer, max_text_len=ctx.max_text_len
    )
    bad = list(range(len(examples))) if batch is None else batch["skipped_question_ids"]
    return batch, bad


def nlvr2_batch(
    lefts: Sequence[str],
    rights: Sequence[str],
    statements: Sequence[str],
    ctx: TaskContext,
    geometry: str = "square_crop",
):
    """-> (nlvr2_collate's batch of the readable pairs or None, positions of the unreadable ones)."""
    examples = [
        NLVR2Example(str(i), " ".join(s.split()), 0, left, right)
        for i, (left, right, s) in enumerate(zip(lefts, rights, statements))
    ]
    dataset = NLVR2Dataset(examples, ctx.image_size, train=False, geometry=geometry)
    items = [dataset[i] for i in range(len(dataset))]
    batch = nlvr2_collate(items, ctx.tokenizer, max_text_len=ctx.max_text_len)
    return batch, [i for i, it in enumerate(items) if it is None]


def retrieval_scores_of(
    model,
    paths: Sequence[str],
    texts: Sequence[str],
    ctx: TaskContext,
    *,
    k: int,
    device,
    dtype,
    batch_size,
    geometry: str = "square_crop",
) -> RetrievalScores:
    """The retrieval evaluation's ITC scores and ITM re-ranking of every (image, text) pair.

    The evaluation takes images with their captions; here the texts are free, so all of them are given
    to the first image (the caption-to-image assignment only matters to the recall metrics, which are
    not computed). Every image must be readable (the caller checks with `load_pixels`).
    """
    images = [RetrievalImage(i, p, tuple(texts) if i == 0 else ()) for i, p in enumerate(paths)]
    return retrieval_scores(
        model,
        images,
        ctx,
        k=k,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        skip_bad=False,
        geometry=geometry,
    )


def pair_batch(path: str, text: str, ctx: TaskContext, geometry: str = "square_crop") -> dict:
    """One (image, text) pair for pre-training heads (MLM, MIM, routing): image (1, 3, S, S) uint8 decoded
    as evaluation does (task.image_geometry `geometry`), text_ids / text_mask (1, L) tokenised as the
    collates do."""
    import torch

    pixels = load_pixels(path, ctx.image_size, geometry)
    if pixels is None:
        raise UnreadableImageError([path])
    tok = ctx.tokenizer(
        [" ".join(text.split())],
        max_length=ctx.max_text_len,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return {
        "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None],
        "text_ids": tok["input_ids"].long(),
        "text_mask": tok["attention_mask"].long(),
    }
