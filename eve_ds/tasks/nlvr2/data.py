"""NLVR2 as distributed: a true/false statement about a pair of images.

Layout under `root` (https://github.com/lil-lab/nlvr/tree/master/nlvr2):

    train.json, dev.json, test1.json     JSON Lines: {"identifier": "train-10171-0-0", "sentence": ...,
                                         "label": "True" | "False", "directory": 21 (train only), ...}
    images/train/<directory>/<pair>-img0.png, -img1.png
    images/dev/<pair>-img0.png, ...      (the same for test1)

where <pair> is the identifier without its last "-N" (the sentence index: several sentences share a pair).
img0 is the left image, img1 the right one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from eve_ds.tasks.base import (
    DATA_ROOT_HINT,
    SKIP_BAD_HINT,
    EpochFlipDataset,
    MissingDataFile,
)
from eve_ds.utils.errors import UserError

TRAIN_SPLIT = "train"
_IDENTIFIER = re.compile(r"^(.+)-(\d+)$")
_KINDS = {int: "an integer", str: "a string"}


class NLVR2DataError(UserError, ValueError):
    """A malformed line of an NLVR2 JSON Lines file; the message names the file, line and field."""


@dataclass(frozen=True)
class NLVR2Example:
    identifier: str  # "train-10171-0-0"
    sentence: str
    label: int  # 1 = True, 0 = False
    left_path: str  # img0
    right_path: str  # img1


def pair_id(identifier: str) -> str:
    """ "train-10171-0-0" -> "train-10171-0", the name of the example's image pair."""
    return identifier.rsplit("-", 1)[0]


def image_paths(root: str, split: str, identifier: str, directory: int | None) -> tuple[str, str]:
    """(left, right) image paths of an example; `directory` is the train split's sub-folder."""
    folder = os.path.join(root, "images", split)
    if directory is not None:
        folder = os.path.join(folder, str(directory))
    stem = os.path.join(folder, pair_id(identifier))
    return f"{stem}-img0.png", f"{stem}-img1.png"


def parse_label(value: object, where: str) -> int:
    """1 for "True", 0 for "False" (any letter case, or a JSON boolean); anything else is an error."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return int(value.lower() == "true")
    raise NLVR2DataError(f'{where}: field "label" must be "True" or "False", got {value!r}')


def _field(obj: dict, name: str, kind: type, where: str):
    if name not in obj:
        raise NLVR2DataError(f'{where}: missing field "{name}" (has {sorted(obj)})')
    value = obj[name]
    # bool is an int subclass; a directory of `true` is as wrong as one of "21".
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NLVR2DataError(f'{where}: field "{name}" must be {_KINDS[kind]}, got {value!r}')
    return value


def parse_line(line: str, where: str, root: str, split: str) -> NLVR2Example:
    """One JSON Lines record -> an example (image existence is not checked here)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise NLVR2DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise NLVR2DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    identifier = _field(obj, "identifier", str, where)
    if not _IDENTIFIER.match(identifier):
        raise NLVR2DataError(f'{where}: field "identifier" must end in "-<number>", got {identifier!r}')
    sentence = " ".join(_field(obj, "sentence", str, where).split())
    if not sentence:
        raise NLVR2DataError(f'{where}: field "sentence" is empty')
    if "label" not in obj:
        raise NLVR2DataError(f'{where}: missing field "label" (has {sorted(obj)})')
    label = parse_label(obj["label"], where)
    directory = _field(obj, "directory", int, where) if split == TRAIN_SPLIT else None
    left, right = image_paths(root, split, identifier, directory)
    return NLVR2Example(identifier, sentence, label, left, right)


def read_nlvr2(root: str, split: str, *, skip_missing: bool = False) -> tuple[list[NLVR2Example], dict]:
    """Parse `root/<split>.json`; returns (examples, {"examples", "missing_image"}).

    A pair with a missing image file is skipped and counted in the train split, and is an error in
    the evaluation splits (dev, test1) unless `skip_missing` -- a silently shrunken test set would
    give a score that cannot be compared. Blank lines are ignored; any other bad line is an error.
    """
    path = os.path.join(root, f"{split}.json")
    if not os.path.exists(path):
        raise MissingDataFile(
            f"NLVR2 split file {path} does not exist (expected {root}/{split}.json; check {DATA_ROOT_HINT})"
        )
    examples, missing = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = parse_line(line, f"{path} line {lineno}", root, split)
            absent = [p for p in (ex.left_path, ex.right_path) if not os.path.exists(p)]
            if absent and split != TRAIN_SPLIT and not skip_missing:
                raise MissingDataFile(
                    f"{path} line {lineno}: image {absent[0]} of {ex.identifier!r} does not exist "
                    f"(to skip such pairs: {SKIP_BAD_HINT})"
                )
            if absent:
                missing += 1
            else:
                examples.append(ex)
    return examples, {"examples": len(examples), "missing_image": missing}


class NLVR2Dataset(EpochFlipDataset):
    """Items {"image": (2, S, S, 3) uint8 (left, right), "text", "label", "identifier"}, or None when an
    image cannot be decoded.

    Training flips BOTH images horizontally with probability `hflip`, keeping their order, but never
    when the sentence says "left" or "right": those words may refer to a position inside an image (a
    flip would change the truth) or to an image (a swap would), and telling which apart is guesswork.
    The flips, the geometry and the augmentation are `EpochFlipDataset`'s, seeded per item and epoch
    (each of the two images its own crop and augmentation).
    """

    def __init__(
        self,
        examples: list[NLVR2Example],
        image_size: int,
        train: bool,
        hflip: float = 0.0,
        seed: int = 0,
        geometry: str = "square_crop",
        augment: str = "none",
    ):
        super().__init__(examples, train=train, hflip=hflip, seed=seed, geometry=geometry, augment=augment)
        self.examples, self.image_size = examples, image_size

    def flip_texts(self, i: int) -> tuple[str, ...]:
        return (self.examples[i].sentence,)

    def __getitem__(self, i: int) -> dict | None:
        ex = self.examples[i]
        try:
            left, right = self.load(ex.left_path, i, 0), self.load(ex.right_path, i, 1)
        except Exception:  # missing, truncated, not an image, decompression bomb: all mean "unusable"
            return None
        image = np.stack([left, right])  # (2, S, S, 3)
        if self.flips(i):
            image = np.ascontiguousarray(image[:, :, ::-1])
        return {"image": image, "text": ex.sentence, "label": ex.label, "identifier": ex.identifier}


def nlvr2_collate(items: list[dict | None], tokenizer, max_text_len: int) -> dict | None:
    """Batch: image (B, 2, 3, S, S) uint8, text_ids / text_mask (B, L) int64, label (B,) int64,
    identifier (list), num_skipped (items that were None). None when every item is None.

    `eve_ds.data.transforms.normalize_image` broadcasts over the extra image axis, so
    `batch_to_device` works on these batches as they are.
    """
    good = [it for it in items if it is not None]
    if not good:
        return None
    image = np.stack([it["image"] for it in good]).transpose(
        0, 1, 4, 2, 3
    )  # (B, 2, S, S, 3) -> channels first
    tok = tokenizer(
        [it["text"] for it in good],
        max_length=max_text_len,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "text_ids": tok["input_ids"].long(),
        "text_mask": tok["attention_mask"].long(),
        "label": torch.tensor([it["label"] for it in good], dtype=torch.int64),
        "identifier": [it["identifier"] for it in good],
        "num_skipped": len(items) - len(good),
    }
