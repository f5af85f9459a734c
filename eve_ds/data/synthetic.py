"""A procedurally generated image-caption corpus that only cross-modal fusion can learn.

Each image shows one to three non-overlapping shapes on a dark noisy background; the caption states
their colours, kinds, sizes and spatial relations ("a large red circle to the left of a small blue
square"). Within a scene colours and kinds are distinct, so every attribute word of the caption can be
recovered from the image and the rest of the caption -- and from nothing else. The scene description is
stored in each sample's `json` so VQA, retrieval or two-image true/false tasks can be derived later.

Generation is a pure function of (seed, split, index): the same seed gives bitwise-identical shards.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

from eve_ds.data.manifest import MANIFEST
from eve_ds.data.sources import sample_key
from eve_ds.data.writer import ShardStats, build_shards, shard_name, write_tar

log = logging.getLogger(__name__)

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 100, 250),
    "yellow": (245, 225, 40),
    "purple": (150, 60, 210),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (12, 16), "large": (24, 30)}  # side length in pixels at 64 px, scaled with image_size
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}

# The words whose masked-token accuracy the trainer's validation reports; each is one BERT token.
ATTRIBUTE_WORDS: dict[str, list[str]] = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "size": list(SIZES),
    "relation": list(RELATIONS),
}
SPLITS = {"train": 0, "val": 1}
VERSION = 1  # bump when the generator changes, so cached corpora are regenerated


def attribute_token_ids(tokenizer) -> dict[str, list[int]]:
    """Token ids of ATTRIBUTE_WORDS by category; fails if a word is not a single token."""
    ids = {}
    for category, words in ATTRIBUTE_WORDS.items():
        for w in words:
            if tokenizer.tokenize(w) != [w]:
                raise ValueError(f"attribute word {w!r} is not a single token: {tokenizer.tokenize(w)}")
        ids[category] = tokenizer.convert_tokens_to_ids(words)
    return ids


def _relation(a: list[int], b: list[int]) -> str | None:
    """Relation of box a to box b (x0, y0, x1, y1), or None when it is not clear-cut.

    Clear-cut: the boxes are apart along one axis by more than their centres differ on the other.
    """
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if gap_x > 0 and abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    if gap_y > 0 and abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _place(rng: np.random.Generator, sides: list[int], image_size: int) -> list[list[int]] | None:
    """Boxes for shapes of the given sides: inside the image, 2 px apart, relations to shape 1 clear."""
    boxes = []
    for side in sides:
        x0, y0 = (int(v) for v in rng.integers(1, image_size - side - 1, size=2))
        box = [x0, y0, x0 + side, y0 + side]
        if any(
            box[0] < b[2] + 2 and b[0] < box[2] + 2 and box[1] < b[3] + 2 and b[1] < box[3] + 2 for b in boxes
        ):
            return None
        boxes.append(box)
    if len(boxes) > 1 and any(_relation(boxes[i], boxes[1]) is None for i in range(len(boxes)) if i != 1):
        return None
    return boxes


def make_scene(rng: np.random.Generator, image_size: int = 64) -> dict:
    """Random scene: {"shapes": [{colour, shape, size, bbox}], "relations": [{subject, relation, object}]}.

    Relations go from every other shape to shape 1 (the caption's anchor).
    """
    for n in (int(rng.integers(1, 4)), 2, 1):  # fall back to fewer shapes if placement keeps failing
        colours = rng.choice(list(COLOURS), n, replace=False)
        kinds = rng.choice(SHAPES, n, replace=False)
        sizes = rng.choice(list(SIZES), n)
        sides = [int(rng.integers(*SIZES[s], endpoint=True)) * image_size // 64 for s in sizes]
        for _ in range(100):
            boxes = _place(rng, sides, image_size)
            if boxes is not None:
                shapes = [
                    {"colour": str(c), "shape": str(k), "size": str(s), "bbox": b}
                    for c, k, s, b in zip(colours, kinds, sizes, boxes)
                ]
                relations = [
                    {"subject": i, "relation": _relation(boxes[i], boxes[1]), "object": 1}
                    for i in range(n)
                    if i != 1 and n > 1
                ]
                return {"shapes": shapes, "relations": relations}
    raise RuntimeError("could not place a single shape")  # unreachable for image_size >= 32


def caption(scene: dict) -> str:
    """ "a large red circle to the left of a small blue square and a small green triangle above the ..."."""
    names = [f"{s['size']} {s['colour']} {s['shape']}" for s in scene["shapes"]]
    if len(names) == 1:
        return f"a {names[0]}"
    rel = {r["subject"]: RELATIONS[r["relation"]] for r in scene["relations"]}
    text = f"a {names[0]} {rel[0]} a {names[1]}"
    if len(names) == 3:
        text += f" and a {names[2]} {rel[2]} the {names[1]}"
    return text


def render(scene: dict, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw the scene on a dark gray background with mild noise."""
    level = int(rng.integers(20, 60))
    noise = rng.normal(0, 4, size=(image_size, image_size, 1))
    background = np.clip(level + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        x0, y0, x1, y1 = s["bbox"]
        fill = COLOURS[s["colour"]]
        if s["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s["shape"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:  # diamond
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    return img


def make_sample(seed: int, split: str, index: int, image_size: int) -> dict:
    """The webdataset sample number `index` of `split`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = make_scene(rng, image_size)
    buf = io.BytesIO()
    # 4:4:4 chroma keeps the colours of small shapes from bleeding into the background.
    render(scene, rng, image_size).save(buf, format="JPEG", quality=95, subsampling=0)
    key = sample_key(f"synthetic_{split}", index)
    meta = {"source": "synthetic", "id": str(index), "path": "", "key": key, "scene": scene}
    return {
        "__key__": key,
        "jpg": buf.getvalue(),
        "txt": caption(scene).encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _synthetic_shard(
    index: int, job: tuple[str, int, int], path: str, seed: int, image_size: int
) -> ShardStats:
    split, start, stop = job
    n = write_tar(path, (make_sample(seed, split, i, image_size) for i in range(start, stop)))
    return ShardStats(shard_name(index), n, sources={"synthetic": n})


def make_synthetic_corpus(
    output_dir: str,
    num_train: int,
    num_val: int,
    seed: int,
    image_size: int = 64,
    samples_per_shard: int = 500,
    workers: int = 1,
) -> dict[str, dict]:
    """Write `output_dir/{train,val}/` (shards + manifest.json); returns the manifests by split."""
    manifests = {}
    for split, num in (("train", num_train), ("val", num_val)):
        jobs = [(split, i, min(i + samples_per_shard, num)) for i in range(0, num, samples_per_shard)]
        fingerprint = {
            "generator": f"synthetic-v{VERSION}",
            "split": split,
            "num_samples": num,
            "seed": seed,
            "image_size": image_size,
            "samples_per_shard": samples_per_shard,
        }
        fn = functools.partial(_synthetic_shard, seed=seed, image_size=image_size)
        manifests[split] = build_shards(
            os.path.join(output_dir, split),
            jobs,
            fn,
            workers=workers,
            fingerprint=fingerprint,
            desc=f"synthetic {split}",
        )
    return manifests


def _spec(split_dir: str, manifest: dict) -> str:
    return os.path.join(split_dir, manifest["spec"])


def ensure_synthetic_corpus(
    cache_dir: str, num_train: int, num_val: int, seed: int, image_size: int = 64
) -> tuple[str, str]:
    """Generate the corpus under `cache_dir` unless it is there; returns (train_spec, val_spec).

    Built in a temporary directory and renamed, so concurrent callers (several ranks) and interrupted
    runs never leave a half-made corpus behind under the final name.
    """
    name = f"synthetic-v{VERSION}-seed{seed}-train{num_train}-val{num_val}-px{image_size}"
    final = os.path.join(os.path.expanduser(cache_dir), name)
    if not os.path.exists(os.path.join(final, "val", MANIFEST)):
        tmp = f"{final}.tmp{os.getpid()}"
        log.info("generating the synthetic corpus in %s", final)
        make_synthetic_corpus(tmp, num_train, num_val, seed, image_size)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its corpus is identical
            shutil.rmtree(tmp)
    specs = []
    for split in ("train", "val"):
        with open(os.path.join(final, split, MANIFEST), encoding="utf-8") as f:
            specs.append(_spec(os.path.join(final, split), json.load(f)))
    return specs[0], specs[1]
