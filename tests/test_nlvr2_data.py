"""NLVR2: the reader on the official layout, the two-image dataset and its flip rule, collation, and the
synthetic generator (determinism, balance, labels that are true of the images)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.data.pipeline import load_tokenizer
from eve_ds.data.synthetic import COLOURS, SHAPES, SIZES
from eve_ds.tasks.nlvr2.data import NLVR2DataError, NLVR2Dataset, nlvr2_collate, read_nlvr2
from eve_ds.tasks.nlvr2.synthetic import (
    TEMPLATES,
    ensure_synthetic_nlvr2,
    make_pair,
    make_synthetic_nlvr2,
    read_scenes,
    read_templates,
)

RED, BLUE, GREEN, WHITE = (230, 40, 40), (40, 100, 250), (40, 190, 60), (245, 245, 245)


def halves(path: str, left: tuple, right: tuple, size: tuple[int, int] = (48, 32)) -> None:
    """A (W, H) PNG whose left half is `left` and right half `right`: a flip is visible in its pixels."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = left, right
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path)


def write_jsonl(path: str, records: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture
def official(tmp_path) -> str:
    """train: pair train-1-0 (directory 3, two sentences) and train-2-1 (directory 7, img1 missing);
    dev: dev-5-0 complete, dev-6-0 without img0."""
    root = str(tmp_path / "nlvr2")
    halves(f"{root}/images/train/3/train-1-0-img0.png", RED, BLUE)
    halves(f"{root}/images/train/3/train-1-0-img1.png", GREEN, WHITE)
    halves(f"{root}/images/train/7/train-2-1-img0.png", RED, BLUE)
    halves(f"{root}/images/dev/dev-5-0-img0.png", RED, BLUE)
    halves(f"{root}/images/dev/dev-5-0-img1.png", GREEN, WHITE)
    halves(f"{root}/images/dev/dev-6-0-img1.png", GREEN, WHITE)
    write_jsonl(
        f"{root}/train.json",
        [
            {
                "identifier": "train-1-0-0",
                "sentence": "one  image has a dog",
                "label": "True",
                "directory": 3,
            },
            {
                "identifier": "train-1-0-1",
                "sentence": "both are red",
                "label": "False",
                "directory": 3,
                "x": 1,
            },
            "",
            {"identifier": "train-2-1-0", "sentence": "a cat", "label": "True", "directory": 7},
        ],
    )
    write_jsonl(
        f"{root}/dev.json",
        [
            {"identifier": "dev-5-0-0", "sentence": "the left image has a dog", "label": "false"},
            {"identifier": "dev-6-0-0", "sentence": "no dogs", "label": "TRUE"},
        ],
    )
    return root


def test_read_train_directories_and_missing_image(official):
    examples, counts = read_nlvr2(official, "train")
    assert counts == {"examples": 2, "missing_image": 1}
    assert [(e.identifier, e.sentence, e.label) for e in examples] == [
        ("train-1-0-0", "one image has a dog", 1),
        ("train-1-0-1", "both are red", 0),
    ]
    assert examples[1].left_path == f"{official}/images/train/3/train-1-0-img0.png"
    assert examples[1].right_path == f"{official}/images/train/3/train-1-0-img1.png"


def test_eval_split_missing_image_is_an_error_unless_skipped(official):
    with pytest.raises(FileNotFoundError, match=r"dev\.json line 2: image .*dev-6-0-img0\.png"):
        read_nlvr2(official, "dev")
    examples, counts = read_nlvr2(official, "dev", skip_missing=True)
    assert counts == {"examples": 1, "missing_image": 1}
    assert (examples[0].identifier, examples[0].label) == ("dev-5-0-0", 0)
    assert examples[0].left_path == f"{official}/images/dev/dev-5-0-img0.png"
    with pytest.raises(FileNotFoundError, match=r"test1\.json"):
        read_nlvr2(official, "test1")


@pytest.mark.parametrize(
    ("label", "expected"),
    [("True", 1), ("False", 0), ("true", 1), ("FALSE", 0), (True, 1), (False, 0), ("yes", None), (1, None)],
)
def test_label_parsing(tmp_path, label, expected):
    halves(f"{tmp_path}/images/dev/dev-1-0-img0.png", RED, BLUE)
    halves(f"{tmp_path}/images/dev/dev-1-0-img1.png", RED, BLUE)
    write_jsonl(f"{tmp_path}/dev.json", [{"identifier": "dev-1-0-0", "sentence": "s", "label": label}])
    if expected is None:
        with pytest.raises(
            NLVR2DataError, match=r'dev\.json line 1: field "label" must be "True" or "False"'
        ):
            read_nlvr2(str(tmp_path), "dev")
    else:
        assert read_nlvr2(str(tmp_path), "dev")[0][0].label == expected


GOOD = {"identifier": "train-1-0-0", "sentence": "s", "label": "True", "directory": 3}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"identifier": "train-1-0-0", "sentence": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "sentence"}, 'missing field "sentence"'),
        ({k: v for k, v in GOOD.items() if k != "label"}, 'missing field "label"'),
        ({k: v for k, v in GOOD.items() if k != "directory"}, 'missing field "directory"'),
        ({**GOOD, "directory": "3"}, 'field "directory" must be an integer'),
        ({**GOOD, "identifier": "train1"}, 'field "identifier" must end in "-<number>"'),
        ({**GOOD, "sentence": "  "}, 'field "sentence" is empty'),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, line, message):
    write_jsonl(f"{tmp_path}/train.json", ["", line])
    with pytest.raises(NLVR2DataError, match=re.escape(f"{tmp_path}/train.json line 2: {message}")):
        read_nlvr2(str(tmp_path), "train")


def test_dataset_items_and_flip_rule(official):
    examples, _ = read_nlvr2(official, "dev", skip_missing=True)  # "the left image has a dog"
    plain = read_nlvr2(official, "train")[0][0]
    item = NLVR2Dataset([plain], image_size=16, train=False)[0]
    assert item["image"].shape == (2, 16, 16, 3) and item["image"].dtype == np.uint8
    assert (item["text"], item["label"], item["identifier"]) == ("one image has a dog", 1, "train-1-0-0")
    # Centre square of 48x32, resized: left half of img0 red, right half blue; img1 green | white.
    left, right = item["image"]
    assert tuple(left[8, 1]) == RED and tuple(left[8, 14]) == BLUE
    assert tuple(right[8, 1]) == GREEN and tuple(right[8, 14]) == WHITE

    flipped = NLVR2Dataset([plain], image_size=16, train=True, hflip=1.0)[0]["image"]
    np.testing.assert_array_equal(flipped, item["image"][:, :, ::-1])  # both mirrored, order kept
    spatial = NLVR2Dataset(examples, image_size=16, train=True, hflip=1.0)[0]["image"]
    assert tuple(spatial[0, 8, 1]) == RED and tuple(spatial[1, 8, 1]) == GREEN  # never for left/right


def test_flip_is_per_item_both_or_neither_and_seeded(official):
    plain = read_nlvr2(official, "train")[0][0]
    ds = NLVR2Dataset([plain] * 40, image_size=8, train=True, hflip=0.5, seed=1)
    flips = []
    for i in range(len(ds)):
        image = ds[i]["image"]
        left_red, right_green = tuple(image[0, 4, 0]) == RED, tuple(image[1, 4, 0]) == GREEN
        assert left_red == right_green  # both images flipped, or neither
        flips.append(not left_red)
    assert 5 < sum(flips) < 35
    assert flips == [bool(tuple(ds[i]["image"][0, 4, 0]) != RED) for i in range(len(ds))]  # repeatable
    ds.set_epoch(1)
    assert flips != [bool(tuple(ds[i]["image"][0, 4, 0]) != RED) for i in range(len(ds))]
    assert not any(
        NLVR2Dataset([plain] * 40, image_size=8, train=False, hflip=1.0).flips(i) for i in range(40)
    )


def test_collate_and_unreadable_image(official):
    good = read_nlvr2(official, "train")[0][0]
    with open(f"{official}/bad.png", "wb") as f:
        f.write(b"not a png")
    ds = NLVR2Dataset([good, dataclasses.replace(good, right_path=f"{official}/bad.png")], 16, train=False)
    items = [ds[0], ds[1], ds[0]]
    assert items[1] is None
    tokenizer = load_tokenizer("bert-base-uncased")
    batch = nlvr2_collate(items, tokenizer, max_text_len=12)
    assert batch["image"].shape == (2, 2, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["image"][0, 1], torch.from_numpy(items[0]["image"][1]).permute(2, 0, 1))
    expected = tokenizer(["one image has a dog"], max_length=12, padding="max_length")["input_ids"][0]
    assert batch["text_ids"].shape == (2, 12) and batch["text_ids"][1].tolist() == expected
    assert batch["text_mask"].dtype == torch.int64 and batch["text_mask"][0].sum() == 7  # [CLS] 5 words [SEP]
    assert batch["label"].tolist() == [1, 1] and batch["label"].dtype == torch.int64
    assert batch["identifier"] == ["train-1-0-0", "train-1-0-0"] and batch["num_skipped"] == 1
    assert nlvr2_collate([None, None], tokenizer, 12) is None


# --- synthetic NLVR2 ---------------------------------------------------------------------------------


def tree_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("syn") / "a")
    return make_synthetic_nlvr2(root, seed=5, num_train=360, num_dev=25, num_test=12, image_size=64)


def test_synthetic_is_deterministic(synthetic, tmp_path):
    again = make_synthetic_nlvr2(str(tmp_path / "b"), seed=5, num_train=360, num_dev=25, num_test=12)
    other = make_synthetic_nlvr2(str(tmp_path / "c"), seed=6, num_train=360, num_dev=25, num_test=12)
    a, b, c = tree_bytes(synthetic), tree_bytes(again), tree_bytes(other)
    assert "images/train/0/train-0-0-img0.png" in a and "images/test1/test1-5-0-img1.png" in a
    assert a == b
    assert (
        a["train.json"] != c["train.json"]
        and a["images/dev/dev-0-0-img0.png"] != c["images/dev/dev-0-0-img0.png"]
    )


def test_synthetic_labels_balanced_per_template(synthetic):
    examples, _ = read_nlvr2(synthetic, "train")
    templates = read_templates(synthetic, "train")
    labels = collections.defaultdict(list)
    for e in examples:
        labels[templates[e.identifier]].append(e.label)
    assert sorted(labels) == sorted(TEMPLATES)
    for template, values in labels.items():
        assert len(values) == 360 // len(TEMPLATES) and 0.4 <= np.mean(values) <= 0.6, template


def test_synthetic_descriptor_form_says_nothing_of_the_label():
    """The form ("a red shape" / "a large red shape") is drawn before the scenes: when it was drawn again
    with every redrawn pair, true "both images contain ..." statements named the size 1 time in 3 (the
    rarely fitting form gave way), false ones 1 in 2, and the words alone told the label."""
    for template in ("both_images", "one_image"):
        for label in (0, 1):
            made = [make_pair(7, "train", i, [(template, label)], 64)["sentences"][0] for i in range(300)]
            sized = np.mean([bool(re.search(r"\b(small|large)\b", s)) for s in made])
            assert 0.4 <= sized <= 0.6, (template, label, sized)


DESCRIPTOR = re.compile(
    r"an? (?:(small|large) )?(?:(" + "|".join(COLOURS) + r") )?(" + "|".join(SHAPES) + r"|shape)"
)


def holds(sentence: str, left: dict, right: dict) -> tuple[str, bool]:
    """(template, truth) of a synthetic statement, parsed from its words and checked against the scenes."""

    def has(scene: dict, phrase: str) -> bool:
        size, colour, kind = DESCRIPTOR.fullmatch(phrase).groups()
        want = {"size": size, "colour": colour, "shape": None if kind == "shape" else kind}
        return any(all(v is None or s[k] == v for k, v in want.items()) for s in scene["shapes"])

    side = {"left": left, "right": right}
    if m := re.fullmatch(r"exactly one image contains (.+)", sentence):
        return "one_image", has(left, m[1]) + has(right, m[1]) == 1
    if m := re.fullmatch(r"both images contain (.+)", sentence):
        return "both_images", has(left, m[1]) and has(right, m[1])
    if m := re.fullmatch(r"neither image contains (.+)", sentence):
        return "neither_image", not has(left, m[1]) and not has(right, m[1])
    m = re.fullmatch(r"the (left|right) image contains (.+)", sentence)
    return "side_contains", has(side[m[1]], m[2])


def test_synthetic_labels_are_true_of_the_scenes_and_pixels(synthetic):
    for split in ("train", "dev", "test1"):
        examples, _ = read_nlvr2(synthetic, split)
        scenes, templates = read_scenes(synthetic, split), read_templates(synthetic, split)
        for e in examples:
            left, right = scenes[e.identifier.rsplit("-", 1)[0]]
            assert holds(e.sentence, left, right) == (templates[e.identifier], bool(e.label)), e
    # The stored scenes are the drawn ones: each shape's centre pixel has its colour, its box its size.
    for pair, (left, right) in list(read_scenes(synthetic, "dev").items())[:6]:
        for scene, k in ((left, 0), (right, 1)):
            pixels = np.asarray(Image.open(f"{synthetic}/images/dev/{pair}-img{k}.png"))
            for s in scene["shapes"]:
                x0, y0, x1, y1 = s["bbox"]
                assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[s["colour"]]
                assert SIZES[s["size"]][0] <= x1 - x0 <= SIZES[s["size"]][1]


def test_real_reader_reads_synthetic_set(synthetic, tmp_path):
    train, counts = read_nlvr2(synthetic, "train")
    assert counts == {"examples": 360, "missing_image": 0}
    assert len({os.path.dirname(e.left_path) for e in train}) == 16  # spread over numbered directories
    assert train[0].left_path == train[1].left_path  # two statements per image pair, as in NLVR2
    assert [len(read_nlvr2(synthetic, s)[0]) for s in ("dev", "test1")] == [25, 12]
    item = NLVR2Dataset(train, image_size=32, train=True, hflip=0.5)[3]
    assert item["image"].shape == (2, 32, 32, 3) and item["text"] == train[3].sentence

    root = ensure_synthetic_nlvr2(str(tmp_path), seed=5, num_train=24, num_dev=4, num_test=2)
    marker = os.path.getmtime(os.path.join(root, "synthetic.json"))
    assert ensure_synthetic_nlvr2(str(tmp_path), seed=5, num_train=24, num_dev=4, num_test=2) == root
    assert os.path.getmtime(os.path.join(root, "synthetic.json")) == marker
    assert os.listdir(tmp_path) == [os.path.basename(root)]  # no temporary directory left behind
    # An example is a function of (seed, split, index): the small set's dev is the big one's first 4 lines.
    with open(f"{root}/dev.json") as small, open(f"{synthetic}/dev.json") as big:
        assert small.readlines() == big.readlines()[:4]
