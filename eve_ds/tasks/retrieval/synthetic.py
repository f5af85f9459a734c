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

from eve_ds.data.synthetic import RELATIONS, caption, make_scene, render
from eve_ds.tasks.retrieval.data import ANNOTATIONS, FLICKR_IMAGE_DIR
from eve_ds.utils.io import atomic_write_text, staging_dir

log = logging.getLogger(__name__)

VERSION = 1  # bump when the generator changes, so cached sets are regenerated
SPLIT_IDS = {"train": 1100, "val": 1101, "test": 1102}
ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}  # image ids: ID_BASE[split] + index
MAX_IMAGES = 1_000_000  # per split, so the id ranges stay apart
RESTVAL_EVERY = 4
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_RELATIVE = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
_COMPACT = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_COUNT = {2: "two", 3: "three"}


def _name(shape: dict, size: bool = True) -> str:
    colour_kind = f"{shape['colour']} {shape['shape']}"
    return f"{shape['size']} {colour_kind}" if size else colour_kind


def _listing(names: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _single_shape_paraphrases(shape: dict) -> list[str]:
    full, short = _name(shape), _name(shape, size=False)
    return [
        f"a {full}",
        f"there is a {full}",
        f"a scene with a single {short}",
        f"one {shape['size']} {shape['shape']} that is {shape['colour']}",
        f"a {short} on a dark background",
        f"a picture of a {full}",
    ]


def _multi_shape_paraphrases(scene: dict, rng: np.random.Generator) -> list[str]:
    """Captions of a 2- or 3-shape scene; relations all go from the other shapes to shapes[1]."""
    shapes = scene["shapes"]
    anchor = shapes[1]
    facts = [(shapes[r["subject"]], r["relation"]) for r in scene["relations"]]  # (subject, its relation)
    mentions = [[shapes[i] for i in rng.permutation(len(shapes))] for _ in range(2)]
    return [
        caption(scene),
        f"a {_name(anchor)} with " + " and ".join(f"a {_name(s)} {_RELATIVE[r]}" for s, r in facts),
        f"there is a {_name(anchor)}; "
        + "; ".join(f"a {_name(s, False)} is {_RELATIVE[r]}" for s, r in facts),
        "a scene with " + _listing([f"a {_name(s, False)}" for s in mentions[0]]),
        " and ".join(f"a {_name(s, False)} {_COMPACT[r]} a {_name(anchor, False)}" for s, r in facts),
        f"the {_name(anchor, False)} is "
        + " and ".join(f"{RELATIONS[_INVERSE[r]]} the {_name(s, False)}" for s, r in facts),
        f"{_COUNT[len(shapes)]} shapes on a dark background: "
        + _listing([f"a {_name(s)}" for s in mentions[1]]),
    ]


def paraphrases(scene: dict, rng: np.random.Generator) -> list[str]:
    """3 to 6 distinct true captions of `scene`, drawn from the templates in a random order."""
    shapes = scene["shapes"]
    candidates = (
        _single_shape_paraphrases(shapes[0]) if len(shapes) == 1 else _multi_shape_paraphrases(scene, rng)
    )
    n = int(rng.integers(3, 7))
    return [candidates[i] for i in rng.choice(len(candidates), n, replace=False)]


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
