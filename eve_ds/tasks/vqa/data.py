"""VQA v2 as distributed: the reader, the minival hold-out, the answer vocabulary, the dataset and collate.

Layout under `root` (https://visualqa.org/download.html):

    v2_OpenEnded_mscoco_<subtype>_questions.json  {"questions": [{"image_id", "question", "question_id"}]}
    v2_mscoco_<subtype>_annotations.json          {"annotations": [{"question_id", "image_id", "answers":
        (train and val only)                       [{"answer", "answer_confidence", "answer_id"}] x 10,
                                                   "answer_type", "question_type", "multiple_choice_answer"}]}
    train2014/COCO_train2014_%012d.jpg, val2014/COCO_val2014_%012d.jpg, test2015/COCO_test2015_%012d.jpg

with <subtype> train2014, val2014, test-dev2015 or test2015 for the splits train, val, test-dev and test
(test-dev is a subset of test: its images are in test2015/).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch

from eve_ds.tasks.base import (
    DATA_ROOT_HINT,
    SKIP_BAD_HINT,
    EpochFlipDataset,
    MissingDataFile,
    read_json_file,
)
from eve_ds.tasks.vqa.eval import normalize_answer, soft_score
from eve_ds.utils.errors import UserError
from eve_ds.utils.io import atomic_write_json

# split -> (file subtype, image folder)
SPLITS = {
    "train": ("train2014", "train2014"),
    "val": ("val2014", "val2014"),
    "test-dev": ("test-dev2015", "test2015"),
    "test": ("test2015", "test2015"),
}
ANNOTATED_SPLITS = ("train", "val")
_KINDS = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


class VQADataError(UserError, ValueError):
    """A malformed VQA file; the message names the file, the record and the field."""


@dataclass(frozen=True)
class VQAExample:
    question_id: int
    image_id: int
    image_path: str
    question: str
    answers: tuple[str, ...] = ()  # the annotators' raw answers (usually 10); () for test splits
    answer_type: str = ""  # "yes/no" | "number" | "other"; "" for test splits
    question_type: str = ""  # "what color is the", "how many", ...; "" for test splits
    multiple_choice_answer: str = ""  # the most frequent answer; what `AnswerVocab.build` counts
    image_ok: bool = True  # False: the image file was missing at read time (read_vqa(missing_ok=True))


def questions_path(root: str, split: str) -> str:
    return os.path.join(root, f"v2_OpenEnded_mscoco_{SPLITS[split][0]}_questions.json")


def annotations_path(root: str, split: str) -> str:
    return os.path.join(root, f"v2_mscoco_{SPLITS[split][0]}_annotations.json")


def image_path(root: str, split: str, image_id: int) -> str:
    folder = SPLITS[split][1]
    return os.path.join(root, folder, f"COCO_{folder}_{image_id:012d}.jpg")


def _field(obj, name: str, kind: type, where: str):
    if not isinstance(obj, dict):
        raise VQADataError(f"{where}: expected a JSON object, got {obj!r:.80}")
    if name not in obj:
        raise VQADataError(f'{where}: missing field "{name}" (has {sorted(obj)})')
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise VQADataError(f'{where}: field "{name}" must be {_KINDS[kind]}, got {value!r:.80}')
    return value


def _read_annotations(path: str) -> dict[int, dict]:
    """question_id -> {"image_id", "answers", "answer_type", "question_type", "multiple_choice_answer"}."""
    out = {}
    for i, ann in enumerate(read_json_file(path, "annotations", VQADataError)):
        where = f"{path}: annotations[{i}]"
        qid = _field(ann, "question_id", int, where)
        answers = tuple(
            _field(a, "answer", str, f"{where}.answers[{j}]")
            for j, a in enumerate(_field(ann, "answers", list, where))
        )
        if not answers:
            raise VQADataError(f'{where}: field "answers" is empty')
        if qid in out:
            raise VQADataError(f"{where}: question_id {qid} is annotated twice")
        out[qid] = {"image_id": _field(ann, "image_id", int, where), "answers": answers}
        for key in ("answer_type", "question_type", "multiple_choice_answer"):
            out[qid][key] = _field(ann, key, str, where)
    return out


def _parse_questions(
    path: str, root: str, split: str, annotations: dict[int, dict] | None
) -> list[VQAExample]:
    """Every question of the file as an example (image existence not checked), annotated when given."""
    examples, seen = [], set()
    ann_path = annotations_path(root, split)
    for i, q in enumerate(read_json_file(path, "questions", VQADataError)):
        where = f"{path}: questions[{i}]"
        qid, image_id = _field(q, "question_id", int, where), _field(q, "image_id", int, where)
        question = " ".join(_field(q, "question", str, where).split())
        if qid in seen:
            raise VQADataError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        extra = {}
        if annotations is not None:
            ann = annotations.get(qid)
            if ann is None:
                raise VQADataError(f"{ann_path}: no annotation for question_id {qid} ({where})")
            if ann["image_id"] != image_id:
                raise VQADataError(
                    f'{ann_path}: question_id {qid} has "image_id" {ann["image_id"]}, '
                    f"{image_id} in the questions file"
                )
            extra = {k: v for k, v in ann.items() if k != "image_id"}
        examples.append(VQAExample(qid, image_id, image_path(root, split, image_id), question, **extra))
    stray = [qid for qid in annotations or () if qid not in seen]
    if stray:
        raise VQADataError(
            f"{ann_path}: {len(stray)} annotations of questions not in {path} (first: {stray[0]})"
        )
    return examples


def read_vqa(
    root: str, split: str, *, skip_missing: bool = False, missing_ok: bool = False
) -> tuple[list[VQAExample], dict]:
    """Parse the questions (and, for train/val, annotations) of `split` -> (examples in file order, counts
    {"questions", "examples", "images", "missing_image"}), where missing_image counts questions whose image
    file does not exist.

    A question with a missing image is an error by default (naming the first missing file); with
    `skip_missing` it is left out and counted (training splits; evaluation only where a smaller set is
    acceptable); with `missing_ok` it is kept with `image_ok=False` and counted, for test splits, whose
    results file must answer every question (`VQADataset` yields it as a bad item). A split's image folder
    that does not exist at all is an error either way: the data root is not the one meant.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
    if skip_missing and missing_ok:
        raise ValueError("pass at most one of skip_missing and missing_ok")
    annotations = _read_annotations(annotations_path(root, split)) if split in ANNOTATED_SPLITS else None
    parsed = _parse_questions(questions_path(root, split), root, split, annotations)
    folder = os.path.join(root, SPLITS[split][1])
    if parsed and not os.path.isdir(folder):
        raise MissingDataFile(
            f"image folder not found ({folder}); the {split} split's COCO images belong there "
            f"(check {DATA_ROOT_HINT})"
        )
    exists: dict[int, bool] = {}  # per image: ~5 questions share each
    examples, missing = [], 0
    for ex in parsed:
        if ex.image_id not in exists:
            exists[ex.image_id] = os.path.exists(ex.image_path)
        if exists[ex.image_id]:
            examples.append(ex)
            continue
        missing += 1
        if missing_ok:
            examples.append(replace(ex, image_ok=False))
        elif not skip_missing:
            raise MissingDataFile(
                f"{questions_path(root, split)}: image {ex.image_path} of question {ex.question_id} does not "
                f"exist (to leave such questions out: {SKIP_BAD_HINT})"
            )
    counts = {"questions": len(parsed), "examples": len(examples), "missing_image": missing}
    counts["images"] = len({ex.image_id for ex in examples})
    return examples, counts


def split_minival(
    examples: list[VQAExample], num_images: int, seed: int
) -> tuple[list[VQAExample], list[VQAExample]]:
    """(rest, minival): minival holds every question of `num_images` images drawn by `seed` from the
    examples' images (sorted ids, so the draw depends on the set of images, not on the file order). Both
    keep the examples' order."""
    image_ids = sorted({ex.image_id for ex in examples})
    if not 0 <= num_images <= len(image_ids):
        raise VQADataError(
            f"task.minival_images={num_images}: the val split has {len(image_ids)} image(s) with their file "
            f"to hold out from; set task.minival_images to at most {len(image_ids)}"
        )
    held = set(random.Random(seed).sample(image_ids, num_images))
    return [ex for ex in examples if ex.image_id not in held], [ex for ex in examples if ex.image_id in held]


class AnswerVocab:
    """The classifier's answers: normalised (`eval.normalize_answer`) answer strings, index = class.

    `build` follows the standard recipe (bottom-up-attention's compute_softscore, used by ViLT, BEiT-3 and
    EVE): count the normalised `multiple_choice_answer` of every question and keep the `size` most frequent
    (3129 on train + val), ties broken by the string.
    """

    def __init__(self, answers: list[str]) -> None:
        if len(set(answers)) != len(answers):
            dup = next(a for a, n in Counter(answers).items() if n > 1)
            raise ValueError(f"answer vocabulary lists {dup!r} twice")
        self.answers = list(answers)
        self._index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def build(cls, examples: list[VQAExample], size: int = 3129) -> AnswerVocab:
        counts = Counter(normalize_answer(ex.multiple_choice_answer) for ex in examples if ex.answers)
        counts.pop("", None)
        if not counts:
            raise ValueError("no annotated examples to build the answer vocabulary from")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([a for a, _ in ranked[:size]])

    def __len__(self) -> int:
        return len(self.answers)

    def index(self, answer: str) -> int | None:
        """Class of `answer` (as written, else normalised); None when it is not in the vocabulary."""
        i = self._index.get(answer)
        return self._index.get(normalize_answer(answer)) if i is None else i

    def answer(self, i: int) -> str:
        return self.answers[i]

    def targets(self, answers: tuple[str, ...] | list[str]) -> torch.Tensor:
        """(A,) float32 soft targets: each vocabulary answer given by n annotators (after normalisation)
        scores `soft_score(n)`; answers outside the vocabulary are dropped."""
        t = torch.zeros(len(self.answers), dtype=torch.float32)
        for answer, n in Counter(normalize_answer(a) for a in answers).items():
            i = self._index.get(answer)
            if i is not None:
                t[i] = soft_score(n)
        return t

    def to_json(self) -> dict:
        return {"answers": self.answers}

    @classmethod
    def from_json(cls, obj: dict) -> AnswerVocab:
        answers = obj.get("answers") if isinstance(obj, dict) else None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f'answer vocabulary: expected {{"answers": [strings]}}, got {obj!s:.80}')
        return cls(answers)

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> AnswerVocab:
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_json(json.load(f))
            except (ValueError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: {e}") from None


class VQADataset(EpochFlipDataset):
    """Items {"image": (S, S, 3) uint8, "question", "question_id", "targets": (A,) float32 (zeros for test
    splits)}; {"question_id", "bad": True} when the image is missing or cannot be decoded, so that collate
    can report which questions went unanswered.

    Training flips the image horizontally with probability `hflip`, never when the question or any answer
    says "left" or "right" (a flip would change the answer); the flips, the geometry and the augmentation
    are `EpochFlipDataset`'s, seeded per item and epoch.
    """

    def __init__(
        self,
        examples: list[VQAExample],
        vocab: AnswerVocab,
        image_size: int,
        train: bool,
        hflip: float = 0.0,
        seed: int = 0,
        geometry: str = "square_crop",
        augment: str = "none",
    ):
        super().__init__(examples, train=train, hflip=hflip, seed=seed, geometry=geometry, augment=augment)
        self.examples, self.vocab, self.image_size = examples, vocab, image_size

    def flip_texts(self, i: int) -> tuple[str, ...]:
        return (self.examples[i].question, *self.examples[i].answers)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        try:
            image = self.load(ex.image_path, i) if ex.image_ok else None
        except Exception:  # missing, truncated, not an image, decompression bomb: all mean "unusable"
            image = None
        if image is None:
            return {"question_id": ex.question_id, "bad": True}
        if self.flips(i):
            image = np.ascontiguousarray(image[:, ::-1])
        return {
            "image": image,
            "question": ex.question,
            "question_id": ex.question_id,
            "targets": self.vocab.targets(ex.answers),
        }


def vqa_collate(items: list[dict], tokenizer, max_text_len: int) -> dict | None:
    """Batch: image (B, 3, S, S) uint8, text_ids / text_mask (B, L) int64, targets (B, A) float32,
    question_id (list), num_skipped and skipped_question_ids (the bad items, left out of the batch).
    None when every item is bad (the trainer skips such batches; an evaluation loop must then treat the
    ids it never saw as skipped -- `eval.write_results` fills them in)."""
    good = [it for it in items if not it.get("bad")]
    if not good:
        return None
    image = np.stack([it["image"] for it in good]).transpose(0, 3, 1, 2)  # (B, S, S, 3) -> (B, 3, S, S)
    tok = tokenizer(
        [it["question"] for it in good],
        max_length=max_text_len,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "text_ids": tok["input_ids"].long(),
        "text_mask": tok["attention_mask"].long(),
        "targets": torch.stack([it["targets"] for it in good]),
        "question_id": [it["question_id"] for it in good],
        "num_skipped": len(items) - len(good),
        "skipped_question_ids": [it["question_id"] for it in items if it.get("bad")],
    }
