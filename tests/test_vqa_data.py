"""VQA v2: the official metric (hand-computed accuracies), the reader on the official layout, minival,
the answer vocabulary, the dataset's flip rule, collation, and the synthetic generator read by the real
reader."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.data.pipeline import load_tokenizer
from eve_ds.data.synthetic import SIZES
from eve_ds.tasks.base import load_image
from eve_ds.tasks.vqa.data import (
    AnswerVocab,
    VQADataError,
    VQADataset,
    VQAExample,
    read_vqa,
    split_minival,
    vqa_collate,
)
from eve_ds.tasks.vqa.eval import (
    normalize_answer,
    score_predictions,
    soft_score,
    vqa_accuracy,
    write_results,
)
from eve_ds.tasks.vqa.synthetic import (
    ID_BASE,
    QUESTIONS_PER_IMAGE,
    ensure_synthetic_vqa,
    make_synthetic_vqa,
    question_type,
    synthetic_image,
)
from eve_ds.utils.errors import UserError

RED, BLUE = (230, 40, 40), (40, 100, 250)


# -- the metric ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two.", "2"),
        ("  two\n", "2"),
        ("none", "0"),
        ("The Dog!", "dog"),
        ("a dog", "dog"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("t-shirt", "t shirt"),  # no space around "-": replaced by a space
        ("t - shirt", "t shirt"),  # a space next to it: deleted (then split/join)
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("Yes?", "yes"),
        ("Im", "im"),  # the official map's capitalised keys never match (the text is lower-cased first)
    ],
)
def test_normalize_answer_as_official(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_soft_score():
    assert [soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        soft_score(-1)


def _gt(agree: list[str], n_agree: int) -> list[str]:
    """10 answers: `agree` spellings cycled n_agree times, the rest other answers (that never match)."""
    others = ["3", "4", "five", "cat", "no", "blue", "6", "7", "8", "9"]
    return [agree[i % len(agree)] for i in range(n_agree)] + others[: 10 - n_agree]


@pytest.mark.parametrize("pred", ["2", "two", "Two.", " TWO ", "the two"])
@pytest.mark.parametrize("n_agree, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_vqa_accuracy_hand_computed(pred, n_agree, expected):
    # Leave-one-out with m matching of 10: m * min(1, (m-1)/3) + (10-m) * min(1, m/3), over 10.
    m = n_agree
    assert math.isclose(expected, round((m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10, 10))
    gt = _gt(["two", "2", "Two"], n_agree)
    assert vqa_accuracy(pred, gt) == pytest.approx(expected)


def test_vqa_accuracy_contractions_and_articles():
    assert vqa_accuracy("dont", _gt(["don't"], 3)) == pytest.approx(0.9)
    assert vqa_accuracy("don't", _gt(["dont"], 3)) == pytest.approx(0.9)
    assert vqa_accuracy("a dog", _gt(["dog", "the dog"], 4)) == pytest.approx(1.0)
    assert vqa_accuracy("dogs", _gt(["dog"], 4)) == 0.0


def test_vqa_accuracy_unanimous_answers_are_not_normalised():
    """The official code normalises only when the annotators disagree (kept, since it is what is scored)."""
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0  # cleaning always happens
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 9 + ["two"]) == 1.0  # now they disagree: normalised
    with pytest.raises(ValueError):
        vqa_accuracy("2", [])


def _ex(qid: int, answers: list[str], answer_type: str, question_type: str = "what") -> VQAExample:
    return VQAExample(qid, 1, "x.jpg", "q?", tuple(answers), answer_type, question_type, answers[0])


def test_score_predictions_per_type(tmp_path):
    examples = [
        _ex(1, ["yes"] * 10, "yes/no", "is the"),
        _ex(2, _gt(["two"], 3), "number", "how many"),
        _ex(3, _gt(["red"], 1), "other"),
        _ex(4, ["blue"] * 10, "other"),
        VQAExample(5, 1, "x.jpg", "q?"),  # a test question: not scored
    ]
    preds = {1: "yes", 2: "2", 3: "red", 4: "green"}
    out = score_predictions(preds, examples)
    assert out["vqa_score"] == pytest.approx((1.0 + 0.9 + 0.3 + 0.0) / 4)
    assert out["vqa_score/yes/no"] == 1.0
    assert out["vqa_score/number"] == pytest.approx(0.9)
    assert out["vqa_score/other"] == pytest.approx(0.15)
    assert out["vqa_score/qtype/what"] == pytest.approx(0.15)
    assert out["vqa_score/qtype/how many"] == pytest.approx(0.9)
    assert (out["num_questions"], out["num_missing"]) == (4, 0)
    with pytest.raises(ValueError, match="1 of 4 questions have no prediction"):
        score_predictions({1: "yes", 2: "2", 3: "red"}, examples)
    partial = score_predictions({1: "yes", 2: "2", 3: "red"}, examples, allow_missing=True)
    assert partial["vqa_score"] == pytest.approx((1.0 + 0.9 + 0.3) / 4) and partial["num_missing"] == 1
    with pytest.raises(ValueError, match="not among the examples"):
        score_predictions({**preds, 99: "yes"}, examples)

    path = tmp_path / "results.json"
    assert write_results(str(path), {5: "red"}, [5, 6], fallback="yes") == 1
    assert json.loads(path.read_text()) == [
        {"question_id": 5, "answer": "red"},
        {"question_id": 6, "answer": "yes"},
    ]


# -- the reader ----------------------------------------------------------------------------------------------


def save_halves(path: str, left=RED, right=BLUE, size=(48, 32)) -> None:
    """A (W, H) JPEG whose left half is `left` and right half `right`: a flip is visible in its pixels."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = left, right
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path, quality=95)


def coco(root, folder: str, image_id: int) -> str:
    return os.path.join(root, folder, f"COCO_{folder}_{image_id:012d}.jpg")


def answers(*spellings: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(spellings)]


def write(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture
def official(tmp_path) -> str:
    """train: images 9 (2 questions) and 10 (missing, 1 question); val: images 20, 21 (2 questions each);
    test-dev / test: image 30 present, 31 missing."""
    root = str(tmp_path / "vqa")
    for folder, image_id in (("train2014", 9), ("val2014", 20), ("val2014", 21), ("test2015", 30)):
        save_halves(coco(root, folder, image_id))
    train_q = [
        {"image_id": 9, "question": "What  color is the bus?", "question_id": 9000},
        {"image_id": 9, "question": "How many dogs?", "question_id": 9001},
        {"image_id": 10, "question": "Is it sunny?", "question_id": 10000},
    ]
    two = ["two", "2", "Two.", "2", "2", "3", "two", "2", "2", "3"]
    train_a = [
        (
            9000,
            9,
            ["Red", "red", "red.", "the red", "red", "red", "blue", "red", "red", "red"],
            "other",
            "red",
        ),
        (9001, 9, two, "number", "2"),
        (10000, 10, ["yes"] * 9 + ["Yes!"], "yes/no", "yes"),
    ]
    val_q = [
        {"image_id": i // 1000, "question": f"q{i}?", "question_id": i} for i in (20000, 20001, 21000, 21001)
    ]
    val_a = [(q["question_id"], q["image_id"], ["no"] * 10, "yes/no", "no") for q in val_q]
    for split, questions, anns in (("train2014", train_q, train_a), ("val2014", val_q, val_a)):
        write(
            f"{root}/v2_OpenEnded_mscoco_{split}_questions.json", {"questions": questions, "task_type": "x"}
        )
        records = [
            {"question_id": q, "image_id": i, "answers": answers(*a), "answer_type": t}
            | {"question_type": "what", "multiple_choice_answer": mc}
            for q, i, a, t, mc in anns
        ]
        write(f"{root}/v2_mscoco_{split}_annotations.json", {"annotations": records})
    test_q = [{"image_id": 30, "question": "left?", "question_id": 30000}]
    test_q += [{"image_id": 31, "question": "right?", "question_id": 31000}]
    for split in ("test-dev2015", "test2015"):
        write(f"{root}/v2_OpenEnded_mscoco_{split}_questions.json", {"questions": test_q})
    return root


def test_read_vqa_counts_and_fields(official):
    with pytest.raises(FileNotFoundError, match=r"COCO_train2014_000000000010\.jpg"):
        read_vqa(official, "train")
    examples, counts = read_vqa(official, "train", skip_missing=True)
    assert counts == {"questions": 3, "examples": 2, "missing_image": 1, "images": 1}
    first = examples[0]
    assert (first.question_id, first.image_id, first.question) == (9000, 9, "What color is the bus?")
    assert first.image_path == coco(official, "train2014", 9)
    assert first.answers[:4] == ("Red", "red", "red.", "the red")  # raw, as the annotators wrote them
    assert (first.answer_type, first.question_type, first.multiple_choice_answer) == ("other", "what", "red")
    assert first.image_ok

    val, counts = read_vqa(official, "val")
    assert counts == {"questions": 4, "examples": 4, "missing_image": 0, "images": 2}
    assert [ex.question_id for ex in val] == [20000, 20001, 21000, 21001]

    for split in ("test-dev", "test"):
        with pytest.raises(FileNotFoundError, match=r"COCO_test2015_000000000031\.jpg"):
            read_vqa(official, split)
        kept, counts = read_vqa(official, split, missing_ok=True)
        assert counts == {"questions": 2, "examples": 2, "missing_image": 1, "images": 2}
        assert [(ex.question_id, ex.image_ok, ex.answers) for ex in kept] == [
            (30000, True, ()),
            (31000, False, ()),
        ]
        assert kept[0].image_path == coco(official, "test2015", 30)
    with pytest.raises(ValueError, match="at most one"):
        read_vqa(official, "test", missing_ok=True, skip_missing=True)
    with pytest.raises(ValueError, match="split='testdev'"):
        read_vqa(official, "testdev")


def test_missing_images_name_the_folder_and_the_flag(official):
    """A root without the split's image folder is refused naming the folder and where the root is set, even
    where missing images would be skipped (training); a missing image names the flag, not a keyword."""
    with pytest.raises(UserError, match=r"does not exist \(to leave such questions out: ") as e:
        read_vqa(official, "train")
    assert "--skip-bad-images" in str(e.value) and "task.skip_bad_eval_images" in str(e.value)
    assert "skip_missing" not in str(e.value) and isinstance(e.value, FileNotFoundError)
    shutil.rmtree(os.path.join(official, "val2014"))
    for kw in ({}, {"skip_missing": True}, {"missing_ok": True}):
        with pytest.raises(UserError) as e:
            read_vqa(official, "val", **kw)
        folder = os.path.join(official, "val2014")
        assert str(e.value).startswith(f"image folder not found ({folder}); the val split's COCO images")
        assert "task.data_root" in str(e.value) and "--data-root" in str(e.value)


def test_malformed_files_name_file_and_field(official):
    qfile = f"{official}/v2_OpenEnded_mscoco_val2014_questions.json"
    afile = f"{official}/v2_mscoco_val2014_annotations.json"
    questions, anns = (json.loads(Path(p).read_text()) for p in (qfile, afile))

    bad = json.loads(json.dumps(questions))
    del bad["questions"][1]["question_id"]
    write(qfile, bad)
    with pytest.raises(VQADataError, match=r'questions\.json: questions\[1\]: missing field "question_id"'):
        read_vqa(official, "val")

    bad["questions"][1]["question_id"] = "20001"
    write(qfile, bad)
    with pytest.raises(VQADataError, match=r'questions\[1\]: field "question_id" must be an integer'):
        read_vqa(official, "val")

    write(qfile, "{not json")
    with pytest.raises(VQADataError, match=r"val2014_questions\.json: not valid JSON"):
        read_vqa(official, "val")

    write(qfile, {"questionz": []})
    with pytest.raises(
        VQADataError, match=r'questions\.json: expected a JSON object with the field "questions"'
    ):
        read_vqa(official, "val")

    write(qfile, questions)
    del anns["annotations"][2]["answers"][3]["answer"]
    write(afile, anns)
    with pytest.raises(
        VQADataError, match=r'annotations\.json: annotations\[2\]\.answers\[3\]: missing field "answer"'
    ):
        read_vqa(official, "val")

    del anns["annotations"][2]  # the broken one: question 21000 has no annotation now
    write(afile, anns)
    with pytest.raises(VQADataError, match=r"annotations\.json: no annotation for question_id 21000"):
        read_vqa(official, "val")

    os.remove(afile)
    with pytest.raises(FileNotFoundError, match=r"v2_mscoco_val2014_annotations\.json"):
        read_vqa(official, "val")


def test_split_minival_is_deterministic_and_holds_whole_images():
    examples = [
        replace(_ex(img * 10 + k, ["x"], "other"), image_id=img) for img in range(20) for k in range(3)
    ]
    rest, mini = split_minival(examples, 5, seed=3)
    _, again_mini = split_minival(list(reversed(examples)), 5, seed=3)
    assert {ex.image_id for ex in mini} == {ex.image_id for ex in again_mini}  # the draw ignores file order
    assert len({ex.image_id for ex in mini}) == 5 and len(mini) == 15 and len(rest) == 45
    assert not {ex.image_id for ex in mini} & {ex.image_id for ex in rest}
    assert sorted(ex.question_id for ex in rest + mini) == sorted(ex.question_id for ex in examples)
    assert [ex.question_id for ex in mini] == sorted(ex.question_id for ex in mini)  # file order kept
    _, other_seed = split_minival(examples, 5, seed=4)
    assert {ex.image_id for ex in other_seed} != {ex.image_id for ex in mini}
    assert split_minival(examples, 0, seed=3) == (examples, [])
    with pytest.raises(VQADataError, match=r"task.minival_images=21: the val split has 20 image\(s\)"):
        split_minival(examples, 21, seed=3)


def test_answer_vocab_ranking_round_trip_and_soft_targets(tmp_path):
    mc = ["2", "Two", "yes", "yes", "Yes.", "no", "no", "no", "red", "blue", "the cat"]
    examples = [_ex(i, [a], "other") for i, a in enumerate(mc)]
    vocab = AnswerVocab.build(examples, size=5)
    # counts after normalisation: yes 3, no 3, 2 2, then blue, cat, red 1 each (ties by string)
    assert vocab.answers == ["no", "yes", "2", "blue", "cat"]
    assert len(vocab) == 5 and vocab.answer(2) == "2"
    assert vocab.index("2") == 2 and vocab.index("Two.") == 2 and vocab.index("red") is None

    path = tmp_path / "sub" / "answers.json"
    vocab.save(str(path))
    loaded = AnswerVocab.load(str(path))
    assert loaded.answers == vocab.answers and AnswerVocab.from_json(vocab.to_json()).answers == vocab.answers
    assert [p.name for p in path.parent.iterdir()] == ["answers.json"]  # no temporary left behind

    t = vocab.targets(["two", "2", "Two.", "no", "No", "cat", "red", "red", "red", "red"])
    assert t.dtype == torch.float32 and t.shape == (5,)
    assert t.tolist() == pytest.approx([0.6, 0.0, 0.9, 0.0, 0.3])  # no, yes, 2, blue, cat; red not in vocab
    assert vocab.targets([]).sum() == 0

    with pytest.raises(ValueError, match="twice"):
        AnswerVocab(["a", "b", "a"])
    path.write_text('{"answers": [1, 2]}')
    with pytest.raises(ValueError, match=r"answers\.json"):
        AnswerVocab.load(str(path))


# -- dataset and collate -------------------------------------------------------------------------------------


def flip_examples(tmp_path) -> tuple[list[VQAExample], np.ndarray]:
    path = str(tmp_path / "img.jpg")
    save_halves(path)
    texts = [
        ("what color is the bus?", ("red",)),
        ("what is on the LEFT side?", ("red",)),
        ("what color is it?", ("the right one",)),  # only an answer mentions a side
        ("is the cat leftover?", ("no",)),  # "leftover" is not "left"
    ]
    examples = [VQAExample(i, 1, path, q, a * 10, "other", "what", a[0]) for i, (q, a) in enumerate(texts)]
    return examples, load_image(path, 16)


def test_dataset_never_flips_left_right_questions(tmp_path):
    examples, reference = flip_examples(tmp_path)
    assert reference[:, 0].mean(0)[0] > 150 and reference[:, -1].mean(0)[2] > 150  # red left, blue right
    vocab = AnswerVocab(["red", "no"])
    ds = VQADataset(examples, vocab, image_size=16, train=True, hflip=1.0, seed=0)
    images = [ds[i]["image"] for i in range(len(ds))]
    np.testing.assert_array_equal(images[0], reference[:, ::-1])
    np.testing.assert_array_equal(images[1], reference)
    np.testing.assert_array_equal(images[2], reference)
    np.testing.assert_array_equal(images[3], reference[:, ::-1])
    item = ds[0]
    assert item["question"] == "what color is the bus?" and item["question_id"] == 0
    assert item["targets"].tolist() == [1.0, 0.0]
    evaluation = VQADataset(examples, vocab, image_size=16, train=False, hflip=1.0)
    np.testing.assert_array_equal(evaluation[0]["image"], reference)

    half = VQADataset(examples * 50, vocab, image_size=16, train=True, hflip=0.5, seed=1)
    flips = [half.flips(i) for i in range(0, 200, 4)]  # the unrestricted question, 50 times
    assert 10 < sum(flips) < 40 and flips == [half.flips(i) for i in range(0, 200, 4)]
    half.set_epoch(1)
    assert [half.flips(i) for i in range(0, 200, 4)] != flips


def test_collate_drops_bad_items_and_lists_their_ids(tmp_path):
    examples, _ = flip_examples(tmp_path)
    broken = str(tmp_path / "broken.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    examples.append(VQAExample(77, 2, broken, "what?", ()))
    examples.append(VQAExample(88, 3, str(tmp_path / "absent.jpg"), "what?", (), image_ok=False))
    vocab = AnswerVocab(["red", "no", "blue"])
    ds = VQADataset(examples, vocab, image_size=16, train=False)
    assert ds[4] == {"question_id": 77, "bad": True} and ds[5] == {"question_id": 88, "bad": True}
    tokenizer = load_tokenizer("bert-base-uncased")
    batch = vqa_collate([ds[i] for i in (4, 0, 5, 3)], tokenizer, max_text_len=8)
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["image"][0].permute(1, 2, 0).numpy(), ds[0]["image"])
    assert batch["text_ids"].shape == (2, 8) and batch["text_ids"].dtype == torch.int64
    assert batch["text_ids"][0, :4].tolist() == [
        101,
        *tokenizer.convert_tokens_to_ids(["what", "color", "is"]),
    ]
    assert batch["targets"].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert batch["question_id"] == [0, 3]
    assert batch["num_skipped"] == 2 and batch["skipped_question_ids"] == [77, 88]
    assert vqa_collate([ds[4], ds[5]], tokenizer, 8) is None


# -- the synthetic set ---------------------------------------------------------------------------------------


def tree(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def test_synthetic_vqa_is_deterministic_and_read_by_the_real_reader(tmp_path):
    sizes = {"num_train_images": 12, "num_val_images": 4, "num_test_images": 3}
    a = make_synthetic_vqa(str(tmp_path / "a"), seed=5, image_size=64, **sizes)
    b = make_synthetic_vqa(str(tmp_path / "b"), seed=5, image_size=64, **sizes)
    files = tree(a)
    assert files == tree(b) and len(files) == 12 + 4 + 3 + 6 + 1
    assert tree(make_synthetic_vqa(str(tmp_path / "c"), seed=6, image_size=64, **sizes)) != files

    expected = {"train": 12, "val": 4, "test-dev": 2, "test": 3}
    for split, n in expected.items():
        examples, counts = read_vqa(a, split)
        q = QUESTIONS_PER_IMAGE * n
        assert counts == {"questions": q, "examples": q, "missing_image": 0, "images": n}
        assert all(ex.answers for ex in examples) == (split in ("train", "val"))
    test_dev, _ = read_vqa(a, "test-dev")
    test, _ = read_vqa(a, "test")
    assert [ex.question_id for ex in test_dev] == [ex.question_id for ex in test][: 2 * QUESTIONS_PER_IMAGE]
    assert test[0].image_id == ID_BASE["test"] and test[0].question_id == ID_BASE["test"] * 1000
    with Image.open(test[0].image_path) as img:
        assert img.size == (64, 64) and img.format == "JPEG"


def test_synthetic_answers_are_true_and_need_normalisation(tmp_path):
    root = make_synthetic_vqa(
        str(tmp_path / "s"), seed=0, num_train_images=60, num_val_images=1, num_test_images=1
    )
    examples, _ = read_vqa(root, "train")
    with open(f"{root}/v2_mscoco_train2014_annotations.json") as f:
        template = {a["question_id"]: a["template"] for a in json.load(f)["annotations"]}
    assert set(template.values()) == {
        "colour",
        "shape",
        "size",
        "count",
        "exists",
        "relation",
        "relation_what",
    }
    by_type, scenes = Counter(), {}
    for ex in examples:
        mc = ex.multiple_choice_answer
        assert vqa_accuracy(mc, ex.answers) == 1.0 and normalize_answer(mc) == mc
        assert ex.question_type == question_type(ex.question) and ex.answer_type in (
            "yes/no",
            "number",
            "other",
        )
        by_type[ex.answer_type, mc if ex.answer_type == "yes/no" else ""] += 1
        if ex.image_id not in scenes:
            scenes[ex.image_id] = synthetic_image(0, "train", ex.image_id - ID_BASE["train"], 64)[0]
        shapes = scenes[ex.image_id]["shapes"]
        kind = template[ex.question_id]
        if kind == "colour":  # "what color is the <shape>?"
            assert any(s["colour"] == mc and ex.question.endswith(f"the {s['shape']}?") for s in shapes)
        elif kind == "count":
            size = ex.question.split()[2]
            assert int(mc) == sum(size in ("shapes", s["size"]) for s in shapes) and size in (
                "shapes",
                *SIZES,
            )
        elif kind == "exists":
            colour, shape = ex.question.rstrip("?").split()[-2:]
            assert (mc == "yes") == any((s["colour"], s["shape"]) == (colour, shape) for s in shapes)
    assert {ex.question_type for ex in examples} >= {"what color is the", "how many", "is there a", "is the"}
    yes, no = by_type["yes/no", "yes"], by_type["yes/no", "no"]
    assert yes + no > 60 and 0.35 < yes / (yes + no) < 0.65
    variants = sum(len({a for a in ex.answers}) > 1 for ex in examples)
    assert variants > len(examples) // 2  # most questions have several spellings or distractors
    assert any("two" in ex.answers or "Two" in ex.answers for ex in examples)


def test_ensure_synthetic_vqa_reuses_a_complete_set(tmp_path):
    kw = {"seed": 1, "num_train_images": 3, "num_val_images": 2, "num_test_images": 2, "image_size": 32}
    root = ensure_synthetic_vqa(str(tmp_path), **kw)
    assert os.path.basename(root) == "synthetic-vqa-v1-seed1-train3-val2-test2-px32"
    marker = os.path.join(root, "synthetic.json")
    stamp = os.stat(marker).st_mtime_ns
    assert ensure_synthetic_vqa(str(tmp_path), **kw) == root and os.stat(marker).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(root)]  # no temporary directory left
    assert read_vqa(root, "val")[1]["examples"] == 2 * QUESTIONS_PER_IMAGE
