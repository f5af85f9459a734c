"""Use a trained EVE from Python: VQA answers, image-text ranking, NLVR2 judgements and embeddings.

    vqa = VQAPredictor.from_pretrained("runs/vqa")          # a run directory or a native export
    vqa.answer("photo.jpg", "what color is the circle?", top_k=3)   # [Answer("red", 0.93), ...]

Every predictor loads the checkpoint with `eve_ds.convert.load_pretraining_model` (encoder, heads and the
saved config with the task's assets) and preprocesses through `eve_ds.infer.preprocess`, i.e. with the
evaluation's own transforms, tokenizer and collates. On a CUDA device the model runs in bf16, as
training does; on the CPU in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from eve_ds.convert import load_pretraining_model
from eve_ds.infer import preprocess as pre
from eve_ds.infer.preprocess import ImageInput, UnreadableImageError
from eve_ds.utils.image import normalize_image

# The head (objective) each task's predictions need.
TASK_HEADS = {"vqa": ("vqa",), "retrieval": ("itc", "itm"), "nlvr2": ("nlvr2",), "mlm": ("mlm",)}


class MissingHeadError(ValueError):
    """The checkpoint was not trained with the head a task needs."""


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float  # sigmoid of the answer's logit (the head is trained with binary cross-entropy)


@dataclass
class Ranking:
    """image_to_text[i]: text positions best first; text_to_image[t]: image positions best first (input
    positions; unreadable images are left out and listed in `unreadable`). i2t (N_img, N_txt) and t2i
    (N_txt, N_img): the re-ranked scores (objective.itm_rerank_score: ITM log-odds or match logit, on each
    row's ITC top k, -1e9 elsewhere); itc (N_img, N_txt): the cosine similarities."""

    image_to_text: list[list[int]]
    text_to_image: list[list[int]]
    i2t: Tensor
    t2i: Tensor
    itc: Tensor
    unreadable: list[int]


class Predictor:
    """A loaded checkpoint: model (eval mode, on `device`), config, task context."""

    task = ""

    def __init__(self, model, config: dict, source: str, device: str = "cpu") -> None:
        heads = sorted(model.objectives)
        missing = [h for h in TASK_HEADS.get(self.task, ()) if h not in heads]
        if missing:
            raise MissingHeadError(
                f"{source}: the checkpoint has no {'/'.join(missing)} head for task {self.task!r} "
                f"(its heads: {', '.join(heads)})"
            )
        self.device = str(device)
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.config, self.source = config, source
        self.ctx = pre.context(config, model.model_cfg, self.task)
        # Images are read as the checkpoint's evaluation read them (task.image_geometry).
        self.geometry = pre.task_config(config, self.task).image_geometry

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu"):
        """A run directory (what `eve-finetune` leaves), a DeepSpeed tag dir or a native export."""
        model, config = load_pretraining_model(path, device="cpu")
        return cls(model, config, str(path), device=device)

    def pixels(self, image: Tensor) -> Tensor:
        """uint8 (B, [2,] 3, S, S) from a collate -> normalised on the device, in the model's dtype."""
        return normalize_image(image.to(self.device), self.dtype, self.ctx.image_mean, self.ctx.image_std)

    def text_inputs(self, batch: dict) -> dict:
        return {
            "image": self.pixels(batch["image"]),
            "text_ids": batch["text_ids"].to(self.device),
            "text_mask": batch["text_mask"].to(self.device),
        }


class VQAPredictor(Predictor):
    task = "vqa"

    def __init__(self, model, config: dict, source: str, device: str = "cpu") -> None:
        super().__init__(model, config, source, device)
        self.vocab = pre.answer_vocab(config, self.ctx)

    @torch.no_grad()
    def logits(self, batch: dict) -> Tensor:
        """vqa_collate's batch -> (B, A) float32 answer logits, as `eve-evaluate` computes them."""
        out = self.model.objectives["vqa"](self.model.encoder, self.text_inputs(batch), None)
        return out["vqa_logits"].float()

    def answer(self, image: ImageInput, question: str, top_k: int = 5) -> list[Answer]:
        """The `top_k` best answers, best first; UnreadableImageError when the image cannot be decoded."""
        (result,) = self.answer_batch([image], [question], top_k=top_k)
        if result is None:
            raise UnreadableImageError([pre.image_name(image, 0)])
        return result

    def answer_batch(
        self, images: Sequence[ImageInput], questions: Sequence[str], top_k: int = 5, batch_size: int = 32
    ) -> list[list[Answer] | None]:
        """One answer list per (image, question) pair, None where the image cannot be decoded."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        out: list[list[Answer] | None] = [None] * len(images)
        k = min(top_k, len(self.vocab))
        for a in range(0, len(images), batch_size):
            with pre.as_paths(images[a : a + batch_size]) as paths:
                batch, _ = pre.vqa_batch(
                    paths, questions[a : a + batch_size], self.vocab, self.ctx, self.geometry
                )
            if batch is None:
                continue
            top = self.logits(batch).topk(k, dim=1)
            for j, scores, idx in zip(batch["question_id"], top.values.sigmoid(), top.indices):
                out[a + j] = [Answer(self.vocab.answer(i), float(s)) for s, i in zip(scores, idx.tolist())]
        return out


class Retriever(Predictor):
    task = "retrieval"

    def rank(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        *,
        k: int | None = None,
        batch_size: int = 32,
        skip_unreadable: bool = False,
    ) -> Ranking:
        """Both directions, ITC over all pairs then ITM re-ranking of each row's top k (default: the
        checkpoint's task.rerank_k), through the retrieval evaluation itself. An unreadable image raises
        UnreadableImageError unless `skip_unreadable` (then it is left out and listed)."""
        if not images or not texts:
            raise ValueError("rank needs at least one image and one text")
        k = k or pre.task_config(self.config, "retrieval").rerank_k
        with pre.as_paths(images) as paths:
            bad = [
                i
                for i, p in enumerate(paths)
                if pre.load_pixels(p, self.ctx.image_size, self.geometry) is None
            ]
            if bad and not skip_unreadable:
                raise UnreadableImageError([pre.image_name(images[i], i) for i in bad])
            keep = [i for i in range(len(paths)) if i not in set(bad)]
            if not keep:
                raise UnreadableImageError([pre.image_name(images[i], i) for i in bad])
            s = pre.retrieval_scores_of(
                self.model,
                [paths[i] for i in keep],
                list(texts),
                self.ctx,
                k=k,
                device=self.device,
                dtype=self.dtype,
                batch_size=batch_size,
                geometry=self.geometry,
            )
        i2t_order, t2i_order = best_first(s.i2t, s.itc), best_first(s.t2i, s.itc.t())
        return Ranking(
            image_to_text=i2t_order,
            text_to_image=[[keep[j] for j in row] for row in t2i_order],
            i2t=s.i2t,
            t2i=s.t2i,
            itc=s.itc,
            unreadable=bad,
        )


def best_first(reranked: Tensor, itc: Tensor) -> list[list[int]]:
    """Column order of each row: by re-ranked score, then (outside the re-ranked top k, where every entry
    holds the same low score) by ITC similarity."""
    by_itc = itc.argsort(dim=1, descending=True, stable=True)
    again = reranked.gather(1, by_itc).argsort(dim=1, descending=True, stable=True)
    return by_itc.gather(1, again).tolist()


@dataclass(frozen=True)
class Judgement:
    value: bool
    score: float  # probability of True (softmax of the head's two logits)


class NLVR2Judge(Predictor):
    task = "nlvr2"

    def judge(self, left: ImageInput, right: ImageInput, statement: str) -> Judgement:
        (result,) = self.judge_batch([left], [right], [statement])
        if result is None:
            raise UnreadableImageError([pre.image_name(left, 0), pre.image_name(right, 1)])
        return result

    @torch.no_grad()
    def judge_batch(
        self,
        lefts: Sequence[ImageInput],
        rights: Sequence[ImageInput],
        statements: Sequence[str],
        batch_size: int = 32,
    ) -> list[Judgement | None]:
        """One judgement per (left, right, statement), None where an image cannot be decoded."""
        if not len(lefts) == len(rights) == len(statements):
            raise ValueError("judge_batch needs as many left images, right images and statements")
        out: list[Judgement | None] = [None] * len(lefts)
        for a in range(0, len(lefts), batch_size):
            part = slice(a, a + batch_size)
            with pre.as_paths(list(lefts[part]) + list(rights[part])) as paths:
                n = len(paths) // 2
                batch, _ = pre.nlvr2_batch(paths[:n], paths[n:], statements[part], self.ctx, self.geometry)
            if batch is None:
                continue
            res = self.model.objectives["nlvr2"](self.model.encoder, self.text_inputs(batch), None)
            prob = res["nlvr2_logits"].float().softmax(1)[:, 1]
            for ident, p in zip(batch["identifier"], prob.tolist()):
                out[a + int(ident)] = Judgement(p > 0.5, p)
        return out


class Embedder(Predictor):
    """The bare encoder: [CLS] outputs of image-only, text-only or fused passes (any checkpoint)."""

    @torch.no_grad()
    def embed(self, images: Sequence[ImageInput] | None = None, texts: Sequence[str] | None = None) -> dict:
        """-> {"image_cls": (B, D)} and/or {"text_cls": (B, D)} float32 from one pass over what is given
        (both: one fused pass, B pairs), plus "hidden" (B, N, D) [image cls; patches; text]."""
        image = ids = mask = None
        if images:
            with pre.as_paths(images) as paths:
                arrays = [pre.load_pixels(p, self.ctx.image_size, self.geometry) for p in paths]
            bad = [i for i, a in enumerate(arrays) if a is None]
            if bad:
                raise UnreadableImageError([pre.image_name(images[i], i) for i in bad])
            image = self.pixels(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
        if texts:
            tok = self.ctx.tokenizer(
                list(texts), max_length=self.ctx.max_text_len, truncation=True, padding="max_length",
                return_tensors="pt",
            )  # fmt: skip
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        enc = self.model.encoder(image, ids, mask)
        out = {"hidden": enc.hidden.float()}
        if image is not None:
            out["image_cls"] = enc.hidden[:, 0].float()
        if ids is not None:
            out["text_cls"] = enc.hidden[:, enc.n_image].float()
        return out
