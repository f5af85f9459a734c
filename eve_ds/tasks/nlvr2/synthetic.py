"""A synthetic NLVR2: true/false statements about pairs of shapes scenes, in NLVR2's official layout.

Each image pair is two `eve_ds.data.synthetic` scenes; STATEMENTS_PER_PAIR statements are written about
it, each from one of TEMPLATES and with a chosen truth value. The templates say that exactly one, both or
neither image contains a described shape (the issue's specification), or that the left / right image
does. Every block of 2 * len(TEMPLATES) consecutive examples holds each (template, label) exactly once,
in a random order, so labels are balanced within every template and the template alone says nothing
about the label. When a pair admits no statement of the wanted (template, label, descriptor form) --
"both images contain a large red shape" cannot be true of two scenes without one -- the pair is drawn
again.

Version 1 also counted shapes ("there are exactly five shapes in total", "the left image has more
shapes than the right image") and named shapes by kind alone ("a circle"), which the tiny pre-trained
encoder cannot read (docs/nlvr2.md); and it chose a descriptor's form after the scenes, so the form
told the label of "both images" statements (text alone: 0.70).

Written files (read by `eve_ds.tasks.nlvr2.data.read_nlvr2`, like the real data set):

    train.json, dev.json, test1.json      NLVR2 JSON Lines, plus a "template" field per line
    images/train/<directory>/<pair>-img0.png ... (dev, test1 without <directory>)
    scenes/<split>.jsonl                  {"pair", "left", "right"}: the scene metadata of every pair
    synthetic.json                        the generator's parameters; written last

Generation is a pure function of (seed, split, index): the same arguments give bitwise-identical files.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable

import numpy as np

from eve_ds.data.synthetic import COLOURS, SIZES, make_scene, render
from eve_ds.utils.io import atomic_write_json

log = logging.getLogger(__name__)

VERSION = 2  # bump when the generator changes, so cached data sets are regenerated
SPLITS = {"train": 0, "dev": 1, "test1": 2}
# Scene seeds [seed, 1020 + split, pair] and block orders [seed, 1040 + split, block]: disjoint from
# pre-training's [seed, 0 | 1, index].
_SCENE_SEEDS, _BLOCK_SEEDS = 1020, 1040
STATEMENTS_PER_PAIR = 2
NUM_DIRECTORIES = 16  # train images are spread over images/train/0 ... /15, as NLVR2 spreads them
SIDES = ("left", "right")

# A descriptor names a shape by its colour, or by its size and colour ("a large yellow shape"): the
# attributes the pre-trained encoder reads (masked-word accuracy: colour 0.79, size 0.87, shape 0.35).
# Each statement's form is drawn once, before any scene: drawn again with every redrawn scene pair, the
# form a (template, label) rarely fits (a true "both images contain a large red shape") would be
# replaced by an easier one, and the form alone would tell the label.
FORMS = (("colour",), ("size", "colour"))
_VALUES = {"size": list(SIZES), "colour": list(COLOURS)}
_DESCRIPTORS = [
    [dict(zip(form, v)) for v in itertools.product(*(_VALUES[a] for a in form))] for form in FORMS
]

Scene = dict
Statement = Callable[[Scene, Scene, np.random.Generator, bool, int], str | None]


def phrase(desc: dict) -> str:
    """{"size": "large", "colour": "orange"} -> "a large orange shape"."""
    words = [desc[a] for a in ("size", "colour") if a in desc] + [desc.get("shape", "shape")]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def contains(scene: Scene, desc: dict) -> bool:
    return any(all(s[a] == v for a, v in desc.items()) for s in scene["shapes"])


def _pick(rng: np.random.Generator, want: bool, form: int, truth: Callable[[dict], bool]) -> dict | None:
    """A random descriptor d of FORMS[form] with truth(d) == want; None when there is none."""
    fits = [d for d in _DESCRIPTORS[form] if truth(d) == want]
    return fits[int(rng.integers(len(fits)))] if fits else None


def one_image(left: Scene, right: Scene, rng: np.random.Generator, want: bool, form: int) -> str | None:
    desc = _pick(rng, want, form, lambda d: contains(left, d) != contains(right, d))
    return None if desc is None else f"exactly one image contains {phrase(desc)}"


def both_images(left: Scene, right: Scene, rng: np.random.Generator, want: bool, form: int) -> str | None:
    desc = _pick(rng, want, form, lambda d: contains(left, d) and contains(right, d))
    return None if desc is None else f"both images contain {phrase(desc)}"


def neither_image(left: Scene, right: Scene, rng: np.random.Generator, want: bool, form: int) -> str | None:
    desc = _pick(rng, want, form, lambda d: not contains(left, d) and not contains(right, d))
    return None if desc is None else f"neither image contains {phrase(desc)}"


def side_contains(left: Scene, right: Scene, rng: np.random.Generator, want: bool, form: int) -> str | None:
    side = SIDES[int(rng.integers(2))]  # left and right are alike: redraws cannot bias it
    scene = left if side == "left" else right
    desc = _pick(rng, want, form, lambda d: contains(scene, d))
    return None if desc is None else f"the {side} image contains {phrase(desc)}"


STATEMENTS: dict[str, Statement] = {
    "one_image": one_image,
    "both_images": both_images,
    "neither_image": neither_image,
    "side_contains": side_contains,
}
TEMPLATES = tuple(STATEMENTS)


@functools.lru_cache(maxsize=64)
def _block(seed: int, split: str, block: int) -> tuple[int, ...]:
    """A random order of the 2 * len(TEMPLATES) (template, label) combinations, as combination numbers."""
    order = np.random.default_rng([seed, _BLOCK_SEEDS + SPLITS[split], block]).permutation(2 * len(TEMPLATES))
    return tuple(int(c) for c in order)


def assignment(seed: int, split: str, index: int) -> tuple[str, int]:
    """(template, label) of example `index`: each block of 2 * len(TEMPLATES) holds every pair once."""
    block, pos = divmod(index, 2 * len(TEMPLATES))
    combo = _block(seed, split, block)[pos]
    return TEMPLATES[combo // 2], combo % 2


def make_pair(seed: int, split: str, pair: int, slots: list[tuple[str, int]], image_size: int) -> dict:
    """Scenes, images (PIL) and one sentence per (template, label) slot for image pair number `pair`."""
    rng = np.random.default_rng([seed, _SCENE_SEEDS + SPLITS[split], pair])
    forms = [int(rng.integers(len(FORMS))) for _ in slots]  # fixed before any scene (see FORMS)
    for _ in range(1000):
        left, right = make_scene(rng, image_size), make_scene(rng, image_size)
        sentences = [STATEMENTS[t](left, right, rng, bool(y), f) for (t, y), f in zip(slots, forms)]
        if all(s is not None for s in sentences):
            images = render(left, rng, image_size), render(right, rng, image_size)
            return {"left": left, "right": right, "sentences": sentences, "images": images}
    # A true "both images contain a large red shape", the rarest slot, fits about one draw in four.
    raise RuntimeError(f"no scene pair fits {slots} after 1000 draws")


def _write_split(root: str, split: str, num: int, seed: int, image_size: int) -> None:
    lines, scene_lines = [], []
    for pair in range((num + STATEMENTS_PER_PAIR - 1) // STATEMENTS_PER_PAIR):
        indices = range(pair * STATEMENTS_PER_PAIR, min((pair + 1) * STATEMENTS_PER_PAIR, num))
        slots = [assignment(seed, split, i) for i in indices]
        made = make_pair(seed, split, pair, slots, image_size)
        pair_id = f"{split}-{pair}-0"  # NLVR2's <split>-<set>-<pair>; one pair per set here
        folder = os.path.join(root, "images", split)
        extra = {}
        if split == "train":
            extra = {"directory": pair % NUM_DIRECTORIES}
            folder = os.path.join(folder, str(extra["directory"]))
        os.makedirs(folder, exist_ok=True)
        for k, img in enumerate(made["images"]):
            img.save(os.path.join(folder, f"{pair_id}-img{k}.png"), compress_level=1)
        for k, ((template, label), sentence) in enumerate(zip(slots, made["sentences"])):
            record = {"identifier": f"{pair_id}-{k}", "sentence": sentence, "label": str(bool(label))}
            lines.append(json.dumps({**record, **extra, "template": template}))
        scene_lines.append(json.dumps({"pair": pair_id, "left": made["left"], "right": made["right"]}))
    with open(os.path.join(root, f"{split}.json"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.makedirs(os.path.join(root, "scenes"), exist_ok=True)
    with open(os.path.join(root, "scenes", f"{split}.jsonl"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in scene_lines))


def make_synthetic_nlvr2(
    root: str, *, seed: int, num_train: int, num_dev: int, num_test: int, image_size: int = 64
) -> str:
    """Write the data set (num_* examples per split; test is "test1") into `root`; returns `root`.

    Writes in place: use `ensure_synthetic_nlvr2` for a directory other processes may read.
    """
    params = {"generator": f"synthetic-nlvr2-v{VERSION}", "seed": seed, "image_size": image_size}
    params["num_examples"] = {"train": num_train, "dev": num_dev, "test1": num_test}
    params.update(templates=list(TEMPLATES), statements_per_pair=STATEMENTS_PER_PAIR)
    os.makedirs(root, exist_ok=True)
    for split, num in params["num_examples"].items():
        _write_split(root, split, num, seed, image_size)
    atomic_write_json(os.path.join(root, "synthetic.json"), params)
    return root


def ensure_synthetic_nlvr2(
    cache_dir: str, *, seed: int, num_train: int, num_dev: int, num_test: int, image_size: int = 64
) -> str:
    """The data set's root under `cache_dir`, generated unless already there.

    Built in a temporary directory and renamed, so concurrent callers (several ranks) and interrupted
    runs never leave a half-made data set under the final name.
    """
    name = (
        f"synthetic-nlvr2-v{VERSION}-seed{seed}-train{num_train}-dev{num_dev}-test{num_test}-px{image_size}"
    )
    final = os.path.join(os.path.expanduser(cache_dir), name)
    if os.path.exists(os.path.join(final, "synthetic.json")):
        return final
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating synthetic NLVR2 in %s", final)
    make_synthetic_nlvr2(
        tmp, seed=seed, num_train=num_train, num_dev=num_dev, num_test=num_test, image_size=image_size
    )
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its data set is identical
        shutil.rmtree(tmp)
        if not os.path.exists(os.path.join(final, "synthetic.json")):
            raise RuntimeError(
                f"{final} exists but is not a complete synthetic NLVR2 (no synthetic.json)"
            ) from None
    return final


def read_templates(root: str, split: str) -> dict[str, str]:
    """identifier -> template name, for per-template accuracy of a synthetic split."""
    with open(os.path.join(root, f"{split}.json"), encoding="utf-8") as f:
        return {r["identifier"]: r["template"] for r in map(json.loads, f) if "template" in r}


def read_scenes(root: str, split: str) -> dict[str, tuple[Scene, Scene]]:
    """pair id ("train-3-0") -> (left scene, right scene), as `eve_ds.data.synthetic.make_scene` made them."""
    with open(os.path.join(root, "scenes", f"{split}.jsonl"), encoding="utf-8") as f:
        return {r["pair"]: (r["left"], r["right"]) for r in map(json.loads, f)}
