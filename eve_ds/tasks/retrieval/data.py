"""Image-text retrieval data: COCO and Flickr30K in the Karpathy splits, read from the files as distributed.

`task.data_root=DIR` holds
    COCO       DIR/dataset_coco.json       images at DIR/<filepath>/<filename> (train2014/, val2014/)
    Flickr30K  DIR/dataset_flickr30k.json  images at DIR/flickr30k-images/<filename>
Both JSONs are {"images": [{"filename", "split", "sentences": [{"raw", ...}], id, ...}]} with id "cocoid"
(COCO) or "imgid" (Flickr30K) and split in train / restval / val / test; training uses train + restval
(113,287 COCO images, as in ALBEF / BEiT-3), evaluation the 5k (COCO) or 1k (Flickr30K) test images with
every one of their captions.

Training is one example per (image, caption) pair; the image id travels with it, so the ITC loss can treat
two captions of the same image in one batch as positives of each other. Evaluation embeds every image
once (`RetrievalImageDataset`) and every caption once (`texts_of`) and scores all pairs
(`eve_ds.tasks.retrieval.eval`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from eve_ds.data.transforms import collate
from eve_ds.tasks.base import SKIP_BAD_HINT, EpochFlipDataset, decode_image, read_json_file
from eve_ds.utils.errors import UserError

log = logging.getLogger(__name__)

ANNOTATIONS = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
ID_FIELD = {"coco": "cocoid", "flickr30k": "imgid"}
FLICKR_IMAGE_DIR = "flickr30k-images"
# The Karpathy split names that make up each split we read.
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
KARPATHY_SPLITS = ("train", "restval", "val", "test")


class RetrievalDataError(UserError, ValueError):
    """A retrieval annotation file or image that cannot be used; the message names it."""


@dataclass(frozen=True)
class RetrievalImage:
    """One image and all of its captions (5 for most COCO / Flickr30K images, but any number is taken)."""

    image_id: int
    image_path: str
    captions: tuple[str, ...]


def _load_json(path: str) -> list:
    """The "images" list of a Karpathy JSON; errors name the file."""
    if not os.path.isfile(path):
        raise RetrievalDataError(f"{path}: annotation file not found (task.data_root must hold it)")
    return read_json_file(path, "images", RetrievalDataError)


def _field(entry, key: str, kind: type | tuple[type, ...], where: str):
    """entry[key], checked to be of `kind`; `where` names the file and the entry in errors."""
    if not isinstance(entry, dict):
        raise RetrievalDataError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise RetrievalDataError(f'{where}: missing field "{key}"')
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RetrievalDataError(f'{where}: field "{key}" is {value!r}, expected {kind}')
    return value


def _captions(entry: dict, where: str) -> tuple[tuple[str, ...], int]:
    """(the entry's captions, whitespace-normalised and non-empty; how many were empty)."""
    captions = []
    sentences = _field(entry, "sentences", list, where)
    for j, sentence in enumerate(sentences):
        raw = _field(sentence, "raw", str, f"{where}.sentences[{j}]")
        text = " ".join(raw.split())
        if text:
            captions.append(text)
    return tuple(captions), len(sentences) - len(captions)


def _image_path(root: str, dataset: str, entry: dict, where: str) -> str:
    filename = _field(entry, "filename", str, where)
    if dataset == "coco":
        return os.path.join(root, _field(entry, "filepath", str, where), filename)
    return os.path.join(root, FLICKR_IMAGE_DIR, filename)


def _entries_of_split(path: str, split: str) -> list[tuple[str, dict, str]]:
    """(where, entry, its Karpathy split) of the entries in `split`; `where` names file and entry."""
    selected = []
    for i, entry in enumerate(_load_json(path)):
        where = f"{path}: images[{i}]"
        karpathy_split = _field(entry, "split", str, where)
        if karpathy_split not in KARPATHY_SPLITS:
            raise RetrievalDataError(
                f'{where}: field "split" is {karpathy_split!r}, expected one of {KARPATHY_SPLITS}'
            )
        if karpathy_split in SPLITS[split]:
            selected.append((where, entry, karpathy_split))
    return selected


def read_karpathy(
    root: str, dataset: str, split: str, *, skip_bad_test_images: bool = False
) -> tuple[list[RetrievalImage], dict[str, int]]:
    """The images of `split` (train = train + restval, val, test) of `dataset` (coco / flickr30k) with
    counts {"images", "captions", "restval", "missing_image", "no_captions", "empty_captions"}.

    A missing image file is skipped and counted for train; for val / test it is an error (the metric
    would silently change) unless `skip_bad_test_images`. Images left without captions are dropped.
    """
    if dataset not in ANNOTATIONS:
        raise RetrievalDataError(f"dataset {dataset!r}: expected one of {sorted(ANNOTATIONS)}")
    if split not in SPLITS:
        raise RetrievalDataError(f"split {split!r}: expected one of {sorted(SPLITS)}")
    path = os.path.join(root, ANNOTATIONS[dataset])
    counts = dict.fromkeys(("restval", "missing_image", "no_captions", "empty_captions"), 0)
    images, seen = [], {}
    for where, entry, karpathy_split in _entries_of_split(path, split):
        image_id = _field(entry, ID_FIELD[dataset], int, where)
        if image_id in seen:
            raise RetrievalDataError(f"{where}: {ID_FIELD[dataset]} {image_id} repeats {seen[image_id]}")
        seen[image_id] = where
        image_path = _image_path(root, dataset, entry, where)
        captions, empty = _captions(entry, where)
        counts["empty_captions"] += empty
        if not os.path.exists(image_path):
            if split != "train" and not skip_bad_test_images:
                raise RetrievalDataError(
                    f"{where}: image file {image_path} of the {split} split is missing "
                    f"(to evaluate without it: {SKIP_BAD_HINT})"
                )
            counts["missing_image"] += 1
        elif not captions:
            counts["no_captions"] += 1
        else:
            images.append(RetrievalImage(image_id, image_path, captions))
            counts["restval"] += karpathy_split == "restval"
    counts = {"images": len(images), "captions": sum(len(im.captions) for im in images), **counts}
    if counts["missing_image"] or counts["no_captions"]:
        log.warning("%s %s: %s", path, split, counts)
    return images, counts


def load_image(path: str, image_size: int, geometry: str = "square_crop") -> np.ndarray:
    """(S, S, 3) uint8 as evaluation reads it (`decode_image`). Raises OSError / ValueError (PIL's errors)
    when the file cannot be read or decoded."""
    return decode_image(path, image_size, geometry)


class RetrievalTrainDataset(EpochFlipDataset):
    """One item per (image, caption) pair: {"image": (S, S, 3) uint8, "text", "image_id"}, or None when
    the image cannot be decoded (counted by `retrieval_train_collate`).

    With `train`, the image is flipped horizontally with probability `hflip` -- never when the caption
    says left or right, which a flip would make false; the flips, the geometry and the augmentation are
    `EpochFlipDataset`'s, seeded per item and epoch.
    """

    def __init__(
        self,
        images: list[RetrievalImage],
        image_size: int,
        train: bool,
        hflip: float = 0.0,
        seed: int = 0,
        geometry: str = "square_crop",
        augment: str = "none",
    ) -> None:
        self.pairs = [(i, j) for i, im in enumerate(images) for j in range(len(im.captions))]
        super().__init__(self.pairs, train=train, hflip=hflip, seed=seed, geometry=geometry, augment=augment)
        self.images, self.image_size = images, image_size

    def flip_texts(self, index: int) -> tuple[str, ...]:
        i, j = self.pairs[index]
        return (self.images[i].captions[j],)

    def __getitem__(self, index: int) -> dict | None:
        i, j = self.pairs[index]
        example, text = self.images[i], self.images[i].captions[j]
        try:
            pixels = self.load(example.image_path, index)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.debug("unreadable image %s: %s", example.image_path, e)
            return None
        if self.flips(index):
            pixels = np.ascontiguousarray(pixels[:, ::-1])
        return {"image": pixels, "text": text, "image_id": example.image_id}


def retrieval_train_collate(items: list[dict | None], tokenizer, max_text_len: int) -> dict | None:
    """Batch dict: image (B, 3, S, S) uint8, text_ids / text_mask (B, L) int64, image_id (B,) int64 (ITC
    positives are the pairs with equal image_id), num_skipped. None when every item was None."""
    kept = [x for x in items if x is not None]
    if not kept:
        return None
    ids = [x["image_id"] for x in kept]
    batch = collate(
        [x["image"] for x in kept],
        [x["text"] for x in kept],
        [str(i) for i in ids],
        tokenizer,
        max_text_len,
        len(items) - len(kept),
    )
    del batch["key"]
    batch["image_id"] = torch.tensor(ids, dtype=torch.int64)
    return batch


class RetrievalImageDataset(Dataset):
    """Evaluation images, one item each: {"image": (S, S, 3) uint8, "index": position in `images`}.

    An unreadable image raises: dropping it would change the test set the recall is reported on.
    """

    def __init__(self, images: list[RetrievalImage], image_size: int, geometry: str = "square_crop") -> None:
        self.images, self.image_size, self.geometry = images, image_size, geometry

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path = self.images[index].image_path
        try:
            return {"image": load_image(path, self.image_size, self.geometry), "index": index}
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RetrievalDataError(f"evaluation image {path} cannot be read: {e}") from None


def retrieval_image_collate(items: list[dict]) -> dict:
    """{"image": (B, 3, S, S) uint8, "index": (B,) int64} from `RetrievalImageDataset` items."""
    image = torch.from_numpy(np.stack([x["image"] for x in items])).permute(0, 3, 1, 2).contiguous()
    return {"image": image, "index": torch.tensor([x["index"] for x in items], dtype=torch.int64)}


def texts_of(images: list[RetrievalImage]) -> tuple[list[str], list[int]]:
    """(every caption, flattened in image order; text_to_image: the position of each caption's image)."""
    texts = [c for im in images for c in im.captions]
    text_to_image = [i for i, im in enumerate(images) for _ in im.captions]
    return texts, text_to_image


def image_to_texts(images: list[RetrievalImage]) -> list[list[int]]:
    """For each image, the positions of its captions in `texts_of(images)[0]`."""
    out, start = [], 0
    for im in images:
        out.append(list(range(start, start + len(im.captions))))
        start += len(im.captions)
    return out
