"""The inference API against `eve-evaluate` on tiny fine-tuned models: the same predictions on the same
inputs, batched equal to one by one, unreadable images named, a missing head named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from infer_fixtures import tiny_run
from PIL import Image

from eve_ds.cli.evaluate import main as evaluate
from eve_ds.infer import MissingHeadError, NLVR2Judge, Retriever, UnreadableImageError, VQAPredictor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    return {task: tiny_run(task, root) for task in ("vqa", "retrieval", "nlvr2")}


def vqa_questions(root: str, split: str = "val") -> list[tuple[int, str, str]]:
    """(question_id, image path, question) of a split in VQA v2's layout."""
    with open(os.path.join(root, f"v2_OpenEnded_mscoco_{split}2014_questions.json")) as f:
        qs = json.load(f)["questions"]
    folder = os.path.join(root, f"{split}2014")
    return [
        (q["question_id"], os.path.join(folder, f"COCO_{split}2014_{q['image_id']:012d}.jpg"), q["question"])
        for q in qs
    ]


def evaluate_predictions(tmp_path, run, task, data, split, capsys) -> Path:
    pred = tmp_path / f"{task}-{split}.pred"
    argv = ["--checkpoint", str(run), "--task", task, "--data-root", data, "--split", split]
    assert evaluate([*argv, "--predictions", str(pred), "--json"]) == 0
    capsys.readouterr()
    return pred


def test_vqa_answers_equal_eve_evaluate_and_batching_changes_nothing(runs, tmp_path, capsys):
    run, data = runs["vqa"]
    pred = evaluate_predictions(tmp_path, run, "vqa", data, "val", capsys)
    expected = {a["question_id"]: a["answer"] for a in json.loads(pred.read_text())}
    qs = vqa_questions(data)
    vqa = VQAPredictor.from_pretrained(run)
    batched = vqa.answer_batch([p for _, p, _ in qs], [q for _, _, q in qs], top_k=3, batch_size=7)
    assert {qid: b[0].answer for (qid, _, _), b in zip(qs, batched)} == expected
    for (_, path, question), b in list(zip(qs, batched))[:5]:
        one = vqa.answer(Image.open(path), question, top_k=3)  # a PIL image, one at a time
        assert [a.answer for a in one] == [a.answer for a in b]
        assert [a.score for a in one] == pytest.approx([a.score for a in b], abs=1e-5)
        assert b[0].score >= b[1].score >= b[2].score


def test_unreadable_image_is_named_and_the_others_are_answered(runs, tmp_path):
    run, data = runs["vqa"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    (_, p0, q0), (_, p1, q1) = vqa_questions(data)[:2]
    vqa = VQAPredictor.from_pretrained(run)
    with pytest.raises(UnreadableImageError, match=r"broken\.jpg"):
        vqa.answer(str(bad), q0)
    got = vqa.answer_batch([p0, str(bad), p1], [q0, q0, q1])
    assert got[1] is None
    for g, (p, q) in ((got[0], (p0, q0)), (got[2], (p1, q1))):
        alone = vqa.answer(p, q)
        assert [a.answer for a in g] == [a.answer for a in alone]
        assert [a.score for a in g] == pytest.approx([a.score for a in alone], abs=1e-5)


def test_missing_head_names_the_checkpoint_and_its_heads(runs):
    run, _ = runs["retrieval"]
    with pytest.raises(MissingHeadError, match=r"no vqa head.*its heads: itc, itm") as e:
        VQAPredictor.from_pretrained(run)
    assert str(run) in str(e.value)


def coco_test(data: str) -> list[str]:
    with open(os.path.join(data, "dataset_coco.json")) as f:
        images = json.load(f)["images"]
    return [os.path.join(data, im["filepath"], im["filename"]) for im in images if im["split"] == "test"]


def test_retrieval_ranking_equals_eve_evaluate_both_directions(runs, tmp_path, capsys):
    run, data = runs["retrieval"]
    pred = json.loads(evaluate_predictions(tmp_path, run, "retrieval", data, "test", capsys).read_text())
    paths = coco_test(data)
    ids = [int(os.path.splitext(p)[0].rsplit("_", 1)[1]) for p in paths]
    retriever = Retriever.from_pretrained(run)
    r = retriever.rank(paths, pred["captions"], batch_size=4)
    assert {str(i): row[:10] for i, row in zip(ids, r.image_to_text)} == pred["text_retrieval"]
    assert [[ids[j] for j in row] for row in r.text_to_image] == pred["image_retrieval"]
    again = retriever.rank(paths, pred["captions"], batch_size=32)
    assert again.image_to_text == r.image_to_text and again.text_to_image == r.text_to_image
    assert torch.allclose(again.i2t, r.i2t, atol=1e-4)


def test_retrieval_unreadable_image(runs, tmp_path):
    run, data = runs["retrieval"]
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    paths = coco_test(data)[:3]
    retriever = Retriever.from_pretrained(run)
    with pytest.raises(UnreadableImageError, match=r"empty\.png"):
        retriever.rank([paths[0], str(bad)], ["a red circle"])
    r = retriever.rank(
        [paths[0], str(bad), paths[1]], ["a red circle", "a blue square"], skip_unreadable=True
    )
    assert r.unreadable == [1] and sorted(r.text_to_image[0]) == [0, 2] and len(r.image_to_text) == 2


def test_nlvr2_judgements_equal_eve_evaluate(runs, tmp_path, capsys):
    run, data = runs["nlvr2"]
    pred = evaluate_predictions(tmp_path, run, "nlvr2", data, "dev", capsys)
    expected = dict(line.split(",") for line in pred.read_text().split())
    lines = [json.loads(x) for x in Path(data, "dev.json").read_text().split("\n") if x.strip()]
    stems = [os.path.join(data, "images", "dev", x["identifier"].rsplit("-", 1)[0]) for x in lines]
    judge = NLVR2Judge.from_pretrained(run)
    got = judge.judge_batch(
        [f"{s}-img0.png" for s in stems], [f"{s}-img1.png" for s in stems], [x["sentence"] for x in lines], 5
    )
    assert {x["identifier"]: str(j.value) for x, j in zip(lines, got)} == expected
    one = judge.judge(f"{stems[0]}-img0.png", f"{stems[0]}-img1.png", lines[0]["sentence"])
    assert one.value == got[0].value and one.score == pytest.approx(got[0].score, abs=1e-5)


def test_eve_predict_contracts_and_list_mode(runs, tmp_path, capsys):
    from eve_ds.cli.predict import main as predict

    run, data = runs["vqa"]
    (_, p0, q0), (_, p1, q1) = vqa_questions(data)[:2]
    assert (
        predict(["--checkpoint", str(run), "--task", "vqa", "--image", p0, "--question", q0, "--json"]) == 0
    )
    answers = json.loads(capsys.readouterr().out)["answers"]
    assert [a["answer"] for a in answers] == [
        a.answer for a in VQAPredictor.from_pretrained(run).answer(p0, q0)
    ]
    assert all(isinstance(a["score"], float) for a in answers)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    listing = tmp_path / "list.tsv"
    listing.write_text(f"{p0}\t{q0}\n{bad.name}\t{q0}\n{p1}\t{q1}\n")  # relative to the list file
    assert predict(["--checkpoint", str(run), "--task", "vqa", "--inputs", str(listing), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert "answers" in results[0] and "answers" in results[2] and "bad.jpg" in results[1]["error"]
    assert predict(["--checkpoint", str(run), "--task", "vqa", "--image", str(bad), "--question", q0]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jpg" in err[0]

    rrun, rdata = runs["retrieval"]
    paths = coco_test(rdata)[:3]
    texts = ["a red circle", "a small blue square"]
    argv = ["--checkpoint", str(rrun), "--task", "retrieval", "--images", *paths, "--texts", *texts, "--json"]
    assert predict(argv) == 0
    out = json.loads(capsys.readouterr().out)
    ranking = Retriever.from_pretrained(rrun).rank(paths, texts)
    assert out["image_to_text"] == ranking.image_to_text and out["text_to_image"] == ranking.text_to_image
    assert predict(["--checkpoint", str(rrun), "--task", "vqa", "--image", p0, "--question", q0]) == 2
    assert "its heads: itc, itm" in capsys.readouterr().err
