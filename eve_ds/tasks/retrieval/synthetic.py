"""Synthetic COCO / Flickr30K retrieval sets in the Karpathy layout, made of shapes scenes.

Each image is a scene of `eve_ds.data.synthetic` with 3 to 6 captions that paraphrase it -- different
templates and orders of mention ("a red circle left of a blue square", "there is a small blue square; a
red circle is to its left", "a scene with a blue square and a red circle", ...), all true of the image.
The files are what `data.read_karpathy` reads from the real datasets:

    coco       dataset_coco.json, train2014/COCO_train2014_%012d.jpg, val2014/COCO_val2014_%012d.jpg
               (every 4th training image is a "restval" image in val2014/, as in Karpathy's split)
    flickr30k  dataset_flickr30k.json, flickr30k-images/%d.jpg

Image `index` of `split` is a pure function of (seed, split, index, image_size), drawn from scene seeds
[seed, 1100 + split, index] that pre-training ([seed, 0 or 1, index]) never uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
from PIL import Image

from eve_ds.data.scene_text import _multi_shape_paraphrases, paraphrases  # noqa: F401  (re-exported)
from eve_ds.data.synthetic import make_scene, render
from eve_ds.tasks.retrieval.data import ANNOTATIONS, FLICKR_IMAGE_DIR
from eve_ds.utils.io import atomic_write_text, staging_dir

log = logging.getLogger(__name__)

VERSION = 1  # bump when the generator changes, so cached sets are regenerated
SPLIT_IDS = {"train": 1100, "val": 1101, "test": 1102}
ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}  # image ids: ID_BASE[split] + index
MAX_IMAGES = 1_000_000  # per split, so the id ranges stay apart
RESTVAL_EVERY = 4


def synthetic_example(
    seed: int, split: str, index: int, image_size: int
) -> tuple[dict, Image.Image, list[str]]:
    """(scene, PIL image, captions) of image `index` of `split`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    scene = make_scene(rng, image_size)
    image = render(scene, rng, image_size)
    return scene, image, paraphrases(scene, rng)


def _location(dataset: str, split: str, index: int) -> tuple[str, str, str, int]:
    """(Karpathy split, folder, file name, image id) of image `index` of `split`."""
    image_id = ID_BASE[split] + index
    if dataset == "flickr30k":
        return split, FLICKR_IMAGE_DIR, f"{image_id}.jpg", image_id
    karpathy = "restval" if split == "train" and index % RESTVAL_EVERY == RESTVAL_EVERY - 1 else split
    folder = "train2014" if karpathy == "train" else "val2014"
    return karpathy, folder, f"COCO_{folder}_{image_id:012d}.jpg", image_id


def _entry(
    dataset: str, split: str, index: int, position: int, first_sentid: int, captions: list[str]
) -> dict:
    """The image's record in Karpathy's format; Flickr30K's "imgid" is its position in the file."""
    karpathy, folder, filename, image_id = _location(dataset, split, index)
    imgid = position if dataset == "flickr30k" else image_id
    sentences = [
        {
            "tokens": c.replace(";", "").replace(",", "").replace(":", "").split(),
            "raw": c,
            "imgid": imgid,
            "sentid": first_sentid + j,
        }
        for j, c in enumerate(captions)
    ]
    entry = {
        "filename": filename,
        "imgid": imgid,
        "sentids": [s["sentid"] for s in sentences],
        "sentences": sentences,
        "split": karpathy,
    }
    if dataset == "coco":
        entry.update(filepath=folder, cocoid=image_id)
    return entry


def _write(out_dir: str, seed: int, dataset: str, sizes: dict[str, int], image_size: int) -> None:
    """Images first, the annotation JSON last (its presence marks a complete set)."""
    entries: list[dict] = []
    num_sentences = 0
    for split, num in sizes.items():
        for index in range(num):
            _, image, captions = synthetic_example(seed, split, index, image_size)
            _, folder, filename, _ = _location(dataset, split, index)
            os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
            # 4:4:4 chroma keeps the colours of small shapes from bleeding into the background.
            image.save(os.path.join(out_dir, folder, filename), format="JPEG", quality=95, subsampling=0)
            entries.append(_entry(dataset, split, index, len(entries), num_sentences, captions))
            num_sentences += len(captions)
    text = json.dumps({"images": entries, "dataset": dataset}, separators=(",", ":"))
    atomic_write_text(os.path.join(out_dir, ANNOTATIONS[dataset]), text)


def _check(dataset: str, sizes: dict[str, int], image_size: int) -> None:
    if dataset not in ANNOTATIONS:
        raise ValueError(f"dataset {dataset!r}: expected one of {sorted(ANNOTATIONS)}")
    for split, num in sizes.items():
        if not 0 <= num <= MAX_IMAGES:
            raise ValueError(f"num_{split}={num}: expected 0 to {MAX_IMAGES}")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: expected at least 32 (the scenes' shapes must fit)")


def make_synthetic_retrieval(
    root: str,
    *,
    seed: int,
    dataset: str = "coco",
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int = 64,
    overwrite: bool = False,
) -> str:
    """Write the set into `root` (built in a sibling temporary directory, then renamed); returns root."""
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    _check(dataset, sizes, image_size)
    with staging_dir(root, overwrite=overwrite) as tmp:
        _write(str(tmp), seed, dataset, sizes, image_size)
    return root


def ensure_synthetic_retrieval(
    cache_dir: str,
    *,
    seed: int,
    dataset: str = "coco",
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int = 64,
) -> str:
    """The directory under `cache_dir` holding this set, generated unless it is already there.

    Concurrent callers (several ranks) each build a private copy and rename it into place; the first
    rename wins and the others, identical, are deleted -- a reader never sees a half-made set.
    """
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    _check(dataset, sizes, image_size)
    name = f"retrieval-{dataset}-v{VERSION}-seed{seed}-train{num_train}-val{num_val}-test{num_test}-px{image_size}"
    final = os.path.join(os.path.expanduser(cache_dir), name)
    marker = os.path.join(final, ANNOTATIONS[dataset])
    if os.path.isfile(marker):
        return final
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating the synthetic %s retrieval set in %s", dataset, final)
    _write(tmp, seed, dataset, sizes, image_size)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its set is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(marker):
            raise
    return final
