"""The synthetic shapes corpus: bitwise determinism, and captions that state what the pixels show.

The caption checks read the caption text with a grammar of their own and measure every shape in the
decoded image (colour mask -> pixel extent, fill ratio, centroid), without the generator's functions.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import decode, read_tars

from eve_ds.data import ATTRIBUTE_WORDS, attribute_token_ids, ensure_synthetic_corpus, load_tokenizer
from eve_ds.data.manifest import expand_spec
from eve_ds.data.synthetic import COLOURS, make_synthetic_corpus

SIZE = 64
NOUN = r"(small|large) (\w+) (circle|square|triangle|diamond)"
REL = r"(to the left of|to the right of|above|below)"
# "a N0", "a N0 R a N1" or "a N0 R a N1 and a N2 R the N1" (every relation is to the second shape).
CAPTION = re.compile(rf"a {NOUN}(?: {REL} a {NOUN}(?: and a {NOUN} {REL} the {NOUN})?)?")


def tree_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return out


def samples(split_dir: str) -> list[dict[str, bytes]]:
    return list(read_tars(split_dir).values())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn") / "a")
    make_synthetic_corpus(root, num_train=60, num_val=20, seed=3, samples_per_shard=25)
    return root


def test_bitwise_deterministic(corpus, tmp_path):
    make_synthetic_corpus(str(tmp_path / "b"), num_train=60, num_val=20, seed=3, samples_per_shard=25)
    make_synthetic_corpus(str(tmp_path / "c"), num_train=60, num_val=20, seed=4, samples_per_shard=25)
    a, b, c = tree_bytes(corpus), tree_bytes(str(tmp_path / "b")), tree_bytes(str(tmp_path / "c"))
    assert "train/shard-000002.tar" in a and "val/manifest.json" in a
    assert a == b
    assert a["train/shard-000000.tar"] != c["train/shard-000000.tar"]


def test_manifests(corpus):
    for split, n, shards in (("train", 60, [25, 25, 10]), ("val", 20, [20])):
        with open(os.path.join(corpus, split, "manifest.json")) as f:
            m = json.load(f)
        assert m["num_samples"] == n and [s["num_samples"] for s in m["shards"]] == shards
        assert m["sources"] == {"synthetic": n} and m["skipped"] == {}
    train_keys = {json.loads(s["json"])["key"] for s in samples(os.path.join(corpus, "train"))}
    val_keys = {json.loads(s["json"])["key"] for s in samples(os.path.join(corpus, "val"))}
    assert len(train_keys) == 60 and len(val_keys) == 20 and not train_keys & val_keys


def parse_caption(text: str) -> tuple[list[tuple[str, str, str]], list[tuple[int, str, int]]]:
    """([(size, colour, shape)], [(subject, relation phrase, object)]) read from the caption text."""
    m = CAPTION.fullmatch(text)
    assert m, text
    g = m.groups()
    objects = [tuple(g[i : i + 3]) for i in (0, 4, 7) if g[i]]
    relations = [(0, g[3], 1)] if g[3] else []
    if g[7]:
        assert tuple(g[11:14]) == objects[1], text  # "the N1" names the second shape again
        relations.append((2, g[10], 1))
    return objects, relations


def measure(pixels: np.ndarray, rgb: tuple[int, int, int]) -> dict | None:
    """The shape drawn in colour `rgb`: pixel box (x0, y0, x1, y1) exclusive, fill ratio of the box and the
    centroid's height in the box (0 top, 1 bottom); None when fewer than 20 pixels have that colour."""
    mask = np.abs(pixels - rgb).max(-1) < 40  # JPEG tolerance; the colours are >= 85 apart in some channel
    if mask.sum() < 20:
        return None
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    w, h = box[2] - box[0], box[3] - box[1]
    return {"box": box, "fill": mask.sum() / (w * h), "cy": (ys.mean() - box[1]) / (h - 1), "side": max(w, h)}


def shape_kind(m: dict) -> str:
    """Square fills its box, a circle pi/4 of it, triangle and diamond half; a triangle (apex up) has its
    centroid at 2/3 of the height, a diamond at 1/2."""
    if m["fill"] > 0.9:
        return "square"
    if m["fill"] > 0.65:
        return "circle"
    return "triangle" if m["cy"] > 0.6 else "diamond"


def holds(relation: str, a: tuple, b: tuple) -> bool:
    """`a relation b` for pixel boxes: apart along the named axis, on the named side."""
    return {
        "to the left of": a[2] <= b[0],
        "to the right of": a[0] >= b[2],
        "above": a[3] <= b[1],
        "below": a[1] >= b[3],
    }[relation]


def mismatches(text: str, pixels: np.ndarray) -> list[str]:
    """What the caption says that the image does not show (empty when they agree)."""
    objects, relations = parse_caption(text)
    found = {c: measure(pixels, rgb) for c, rgb in COLOURS.items()}
    problems = []
    if {c for c, m in found.items() if m} != {colour for _, colour, _ in objects}:
        problems.append(f"colours in the image: {sorted(c for c, m in found.items() if m)}")
    boxes = []
    for size, colour, shape in objects:
        m = found[colour]
        if m is None:
            continue
        if shape_kind(m) != shape:
            problems.append(f"the {colour} shape looks like a {shape_kind(m)}: {m}")
        lo, hi = (12, 16) if size == "small" else (24, 30)  # side in pixels at 64 px
        if not lo <= m["side"] <= hi:
            problems.append(f"the {colour} shape is {m['side']} px, not {size}")
        boxes.append(m["box"])
    if len(boxes) == len(objects):
        for subject, relation, obj in relations:
            if not holds(relation, boxes[subject], boxes[obj]):
                problems.append(f"not {objects[subject]} {relation} {objects[obj]}: {boxes}")
    return problems


def test_captions_state_what_the_pixels_show(corpus):
    seen = {"objects": set(), "shapes": set(), "relations": set()}
    for s in samples(os.path.join(corpus, "train")):
        text, pixels = s["txt"].decode(), decode(s["jpg"])
        assert pixels.shape == (SIZE, SIZE, 3)
        assert mismatches(text, pixels) == [], text
        objects, relations = parse_caption(text)
        # The scene stored with the sample agrees with the image too.
        scene = json.loads(s["json"])["scene"]
        assert [(x["size"], x["colour"], x["shape"]) for x in scene["shapes"]] == objects
        boxes = [measure(pixels, COLOURS[c])["box"] for _, c, _ in objects]
        assert [list(map(int, b)) for b in boxes] == [x["bbox"] for x in scene["shapes"]]
        seen["objects"].add(len(objects))
        seen["shapes"] |= {shape for *_, shape in objects}
        seen["relations"] |= {r for _, r, _ in relations}
    assert seen["objects"] == {1, 2, 3}
    assert seen["shapes"] == {"circle", "square", "triangle", "diamond"}
    assert seen["relations"] == {"to the left of", "to the right of", "above", "below"}


SWAP = {
    "small": "large",
    "large": "small",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def test_a_wrong_word_is_caught(corpus):
    """The checks above can fail: one wrong colour, shape, size or relation word is noticed."""
    caught = {"colour": 0, "shape": 0, "size": 0, "relation": 0}
    for s in samples(os.path.join(corpus, "train"))[:20]:
        text, pixels = s["txt"].decode(), decode(s["jpg"])
        objects, relations = parse_caption(text)
        size, colour, shape = objects[0]
        absent = next(c for c in COLOURS if c not in text)
        other_shape = next(k for k in ("circle", "square", "triangle", "diamond") if k not in text)
        edits = {
            "colour": text.replace(colour, absent),
            "shape": text.replace(f"{colour} {shape}", f"{colour} {other_shape}"),
            "size": text.replace(f"{size} {colour}", f"{SWAP[size]} {colour}"),
        }
        if relations:  # the first relation phrase in the text is the first shape's
            edits["relation"] = text.replace(relations[0][1], SWAP[relations[0][1]], 1)
        for kind, edited in edits.items():
            assert edited != text and mismatches(edited, pixels), (kind, edited)
            caught[kind] += 1
    assert min(caught.values()) > 5


def test_attribute_words_are_single_tokens():
    tok = load_tokenizer()
    ids = attribute_token_ids(tok)
    assert set(ids) == {"colour", "shape", "size", "relation"}
    for category, words in ATTRIBUTE_WORDS.items():
        assert tok.convert_ids_to_tokens(ids[category]) == words
    assert "circle" in ATTRIBUTE_WORDS["shape"] and "left" in ATTRIBUTE_WORDS["relation"]
    assert 6 <= len(ATTRIBUTE_WORDS["colour"]) <= 8


def test_ensure_generates_once(tmp_path):
    train, val = ensure_synthetic_corpus(str(tmp_path), num_train=30, num_val=10, seed=0, image_size=32)
    assert len(expand_spec(train)) == 1 and all(
        os.path.exists(u) for u in expand_spec(train) + expand_spec(val)
    )
    stamp = os.stat(expand_spec(train)[0]).st_mtime_ns
    assert ensure_synthetic_corpus(str(tmp_path), num_train=30, num_val=10, seed=0, image_size=32) == (
        train,
        val,
    )
    assert os.stat(expand_spec(train)[0]).st_mtime_ns == stamp
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
    assert decode(samples(os.path.dirname(expand_spec(val)[0]))[0]["jpg"]).shape == (32, 32, 3)
