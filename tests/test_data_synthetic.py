"""The synthetic shapes corpus: bitwise determinism, captions that match the scenes and the pixels."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from eve_ds.data import ATTRIBUTE_WORDS, attribute_token_ids, ensure_synthetic_corpus, load_tokenizer
from eve_ds.data.manifest import expand_spec
from eve_ds.data.synthetic import COLOURS, RELATIONS, _relation, caption, make_synthetic_corpus


def tree_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return out


def samples(split_dir: str) -> list[dict]:
    result = {}
    for name in sorted(os.listdir(split_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(split_dir, name)) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    result.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(result.values())


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


def test_captions_match_scenes_and_pixels(corpus):
    counts = {1: 0, 2: 0, 3: 0}
    for s in samples(os.path.join(corpus, "train")):
        scene = json.loads(s["json"])["scene"]
        text = s["txt"].decode()
        assert text == caption(scene)
        shapes = scene["shapes"]
        counts[len(shapes)] += 1
        assert len({x["colour"] for x in shapes}) == len(shapes) == len({x["shape"] for x in shapes})
        for x in shapes:
            assert f"{x['size']} {x['colour']} {x['shape']}" in text
        for r in scene["relations"]:
            a, b = shapes[r["subject"]]["bbox"], shapes[r["object"]]["bbox"]
            assert _relation(a, b) == r["relation"] and RELATIONS[r["relation"]] in text
        pixels = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(int)
        assert pixels.shape == (64, 64, 3)
        for x in shapes:
            x0, y0, x1, y1 = x["bbox"]
            assert 12 <= x1 - x0 <= 30 and x0 >= 0 and x1 <= 64
            # A point inside the shape: a triangle's apex is at the top.
            cy = (y0 + 2 * y1) // 3 if x["shape"] == "triangle" else (y0 + y1) // 2
            assert np.abs(pixels[cy, (x0 + x1) // 2] - COLOURS[x["colour"]]).max() < 40
    assert all(n > 0 for n in counts.values())


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
    img = Image.open(io.BytesIO(samples(os.path.dirname(expand_spec(val)[0]))[0]["jpg"]))
    assert img.size == (32, 32)
