"""EVLM on the public benchmarks: the readers on small files in each benchmark's official layout (real
JPEG / PNG images, JSON, JSON lines, TSV with base64 images), the official metrics against hand-computed
values (the normalisations, POPE's and MME's answer parsing, MMBench's CircularEval), and `eve-evaluate` of
a tiny EVLM run trained for a few steps (its LM a tiny Qwen2 with its tokenizer, both save_pretrained):
`--task evlm_synthetic` and the benchmark tasks."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from conftest import image_bytes

from eve_ds.cli.evaluate import main as evaluate_main
from eve_ds.cli.pretrain import main as pretrain_main
from eve_ds.tasks.base import MissingDataFile, TaskDataError
from eve_ds.tasks.evlm_bench.data import CIRCULAR, READERS, SHORT_ANSWER
from eve_ds.tasks.evlm_bench.metrics import (
    SCORERS,
    evalai_answer,
    gqa_answer,
    mme_answer,
    option_letter,
    pope_answer,
    textvqa_accuracy,
)
from eve_ds.tasks.vqa.eval import vqa_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def image(path: Path, colour=RED, fmt: str = "JPEG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, fmt=fmt, size=(40, 30)))
    return path.name


def vqav2(root: Path) -> None:
    for i, c in enumerate((RED, GREEN)):
        image(root / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg", c)
    qs = [{"image_id": 1, "question": "What color is it?", "question_id": 10},
          {"image_id": 2, "question": "Is it green?", "question_id": 20}]  # fmt: skip
    anns = [{"question_id": 10, "image_id": 1, "answers": [{"answer": "red", "answer_confidence": "yes",
             "answer_id": j} for j in range(10)], "answer_type": "other", "question_type": "what color",
             "multiple_choice_answer": "red"},
            {"question_id": 20, "image_id": 2, "answers": [{"answer": "yes", "answer_confidence": "yes",
             "answer_id": j} for j in range(10)], "answer_type": "yes/no", "question_type": "is it",
             "multiple_choice_answer": "yes"}]  # fmt: skip
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": qs})
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": anns})


def gqa(root: Path) -> None:
    image(root / "images" / "n1.jpg", RED)
    image(root / "images" / "n2.jpg", BLUE)
    write_json(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Which color is the ball?", "answer": "red",
                "fullAnswer": "The ball is red.", "types": {"structural": "query"}},
        "202": {"imageId": "n2", "question": "Is the sky blue?", "answer": "yes"},
    })  # fmt: skip


def textvqa(root: Path) -> None:
    image(root / "train_images" / "abc.jpg", GREEN)
    answers = ["stop"] * 2 + ["go"] * 8
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "data": [
        {"question_id": 34602, "image_id": "abc", "question": "what does the sign say?", "answers": answers,
         "image_classes": ["sign"]}]})  # fmt: skip


def pope(root: Path, bad: bool = False) -> None:
    image(root / "val2014" / "COCO_val2014_000000000001.jpg", RED)
    image(root / "val2014" / "COCO_val2014_000000000002.png", BLUE, fmt="PNG")
    if bad:  # truncated: a JPEG header and nothing else
        (root / "val2014" / "COCO_val2014_000000000003.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    for s, sampler in enumerate(("random", "popular", "adversarial")):
        lines = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a ball?",
                  "label": "yes"},
                 {"question_id": 2, "image": "COCO_val2014_000000000002.png", "text": f"Is there a cat {s}?",
                  "label": "no"}]  # fmt: skip
        if bad and sampler == "random":
            lines.append({"question_id": 3, "image": "COCO_val2014_000000000003.jpg", "text": "Is there a dog?",
                          "label": "no"})  # fmt: skip
        path = root / f"coco_pope_{sampler}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def mme(root: Path) -> None:
    # A category of the first kind (images/ + questions_answers_YN/) and one of the second (side by side).
    image(root / "artwork" / "images" / "10002.jpg", RED)
    qa = root / "artwork" / "questions_answers_YN" / "10002.txt"
    qa.parent.mkdir(parents=True)
    qa.write_text("Is this artwork by Monet? Please answer yes or no.\tYes\n"
                  "Is this artwork by Goya? Please answer yes or no.\tNo\n")  # fmt: skip
    image(root / "color" / "000000006723.png", GREEN, fmt="PNG")
    (root / "color" / "000000006723.txt").write_text(
        "Is there a green wall in the image? Please answer yes or no.\tYes\n"
        "Is there a red wall in the image? Please answer yes or no.\tNo\n"
    )


def mmbench(root: Path) -> None:
    png = base64.b64encode(image_bytes(RED, fmt="PNG", size=(30, 30))).decode()
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category",
            "split"]  # fmt: skip
    rows = [["0", "What color is the square?", "Look at it.", "red", "green", "blue", "nan", "A",
             "attribute_recognition", png, "finegrained_perception", "dev"],
            ["1", "Which shape?", "nan", "circle", "square", "nan", "nan", "B", "object_localization", "0",
             "finegrained_perception", "dev"]]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "MMBench_DEV_EN.tsv").write_text("\n".join("\t".join(r) for r in [cols, *rows]) + "\n")


BUILDERS = {"vqav2": vqav2, "gqa": gqa, "textvqa": textvqa, "pope": pope, "mme": mme, "mmbench": mmbench}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("benchmarks")
    for name, build in BUILDERS.items():
        build(base / name)
    return {name: base / name for name in BUILDERS}


# -- readers --------------------------------------------------------------------------------------------------


def test_readers_give_questions_with_images_prompts_and_answers(roots):
    got = {name: READERS[name](str(root), None) for name, root in roots.items()}
    assert [q.question_id for q in got["vqav2"]] == [10, 20] and got["vqav2"][0].answers == ("red",) * 10
    assert got["vqav2"][0].prompt == f"What color is it?\n{SHORT_ANSWER}"
    assert [(q.key, q.answers) for q in got["gqa"]] == [("201", ("red",)), ("202", ("yes",))]
    assert got["gqa"][1].image.endswith("images/n2.jpg")
    assert len(got["textvqa"][0].answers) == 10 and got["textvqa"][0].image.endswith("train_images/abc.jpg")
    assert [q.key for q in got["pope"]][:3] == ["random/1", "random/2", "popular/1"]  # ids restart per file
    assert {q.meta["sampler"] for q in got["pope"]} == {"random", "popular", "adversarial"}
    assert [(q.key, q.answers) for q in got["mme"]] == [  # in MME's category order
        ("color/000000006723/0", ("yes",)), ("color/000000006723/1", ("no",)),
        ("artwork/10002/0", ("yes",)), ("artwork/10002/1", ("no",)),
    ]  # fmt: skip
    assert got["mme"][0].image.endswith("color/000000006723.png")
    assert got["mme"][2].image.endswith("artwork/images/10002.jpg")
    assert all(
        Path(q.image).is_file() for name in ("vqav2", "gqa", "textvqa", "pope", "mme") for q in got[name]
    )


def test_mmbench_rows_are_rotated_with_their_answer_and_share_images(roots):
    qs = READERS["mmbench"](str(roots["mmbench"]), "DEV_EN")
    assert [q.question_id for q in qs] == [0, CIRCULAR, 2 * CIRCULAR, 1, 1 + CIRCULAR]  # 3 and 2 options
    first, second = qs[0], qs[1]
    assert first.prompt == ("Look at it.\nWhat color is the square?\nA. red\nB. green\nC. blue\n"
                            "Answer with the option's letter from the given choices directly.")  # fmt: skip
    assert second.meta["options"] == {"A": "green", "B": "blue", "C": "red"} and second.answers == ("C",)
    assert qs[2].answers == ("B",) and qs[4].answers == ("A",)
    assert qs[3].prompt.startswith("Which shape?\nA. circle")  # "nan" hint left out
    assert qs[3].image == first.image and qs[3].image[:8] == b"\x89PNG\r\n\x1a\n"  # image "0": row 0's


def test_a_file_with_rotations_is_not_rotated_again(tmp_path, roots):
    text = (roots["mmbench"] / "MMBench_DEV_EN.tsv").read_text().splitlines()
    row = text[1].split("\t")
    rotated = [str(CIRCULAR), row[1], row[2], "green", "blue", "red", "nan", "C", *row[8:]]
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("\n".join([*text[:2], "\t".join(rotated)]) + "\n")
    qs = READERS["mmbench"](str(tmp_path), None)
    assert [(q.question_id, q.answers, q.meta["group"]) for q in qs] == [
        (0, ("A",), 0),
        (CIRCULAR, ("C",), 0),
    ]


def test_mme_eval_tool_lists_give_the_same_questions_as_the_release_files(tmp_path, roots):
    import shutil

    shutil.copytree(roots["mme"], tmp_path / "mme")
    tool = tmp_path / "mme" / "eval_tool" / "Your_Results"
    tool.mkdir(parents=True)
    for category, name in (("artwork", "10002.jpg"), ("color", "000000006723.png")):
        folder = roots["mme"] / category
        txt = next(folder.rglob("*.txt"))
        tool.joinpath(f"{category}.txt").write_text(
            "".join(f"{name}\t{line}\n" for line in txt.read_text().splitlines())
        )
        shutil.rmtree(tmp_path / "mme" / category / "questions_answers_YN", ignore_errors=True)
        for stray in (tmp_path / "mme" / category).glob("*.txt"):
            stray.unlink()  # only the eval tool's lists are left to read from
    release = READERS["mme"](str(roots["mme"]), None)
    listed = READERS["mme"](str(tmp_path / "mme"), None)
    assert [(q.key, q.prompt, q.answers) for q in listed] == [(q.key, q.prompt, q.answers) for q in release]
    assert [Path(q.image).relative_to(tmp_path / "mme") for q in listed] == [
        Path(q.image).relative_to(roots["mme"]) for q in release
    ]
    tool.joinpath("color.txt").write_text("000000006723.png\tIs it green?\tmaybe\n")
    with pytest.raises(TaskDataError, match=r"Your_Results/color\.txt:1: expected 'question<TAB>Yes\|No'"):
        READERS["mme"](str(tmp_path / "mme"), None)


def test_missing_files_and_keys_are_one_line_errors_naming_them(tmp_path, roots):
    with pytest.raises(MissingDataFile, match=r"testdev_balanced_questions\.json does not exist"):
        READERS["gqa"](str(tmp_path), None)
    write_json(tmp_path / "testdev_balanced_questions.json", {"7": {"question": "q?", "answer": "a"}})
    (tmp_path / "images").mkdir()
    with pytest.raises(TaskDataError, match=r'question 7: expected a field "imageId"'):
        READERS["gqa"](str(tmp_path), None)
    with pytest.raises(MissingDataFile, match=r"image folder .*val2014 does not exist"):
        READERS["pope"](str(tmp_path), None)
    (tmp_path / "val2014").mkdir()
    (tmp_path / "coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg", "text": "t", '
                                                     '"label": "maybe"}\n')  # fmt: skip
    with pytest.raises(TaskDataError, match=r'coco_pope_random\.json:1: "label" must be yes or no'):
        READERS["pope"](str(tmp_path), "random")
    with pytest.raises(MissingDataFile, match="no MME category folder"):
        READERS["mme"](str(tmp_path), None)
    with pytest.raises(MissingDataFile, match=r"MMBench_DEV_CN\.tsv does not exist"):
        READERS["mmbench"](str(roots["mmbench"]), "DEV_CN")
    for error in (MissingDataFile, TaskDataError):
        assert issubclass(error, Exception)


# -- metrics --------------------------------------------------------------------------------------------------


def test_textvqa_normalises_always_and_averages_leave_one_out():
    assert evalai_answer("The Two Dogs!") == "2 dogs" and evalai_answer("Joe's, cafe?") == "joe 's cafe"
    # 2 of 10 annotators said "stop": the 2 subsets without one of them have 1 match, the 8 others 2.
    assert textvqa_accuracy("Stop.", ["stop"] * 2 + ["go"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert textvqa_accuracy("Two", ["2"] * 10) == 1.0  # always normalised ...
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0  # ... VQAv2 only when the annotators disagree


def test_gqa_and_pope_parse_answers_as_their_official_scripts():
    assert gqa_answer(" Yes.") == "yes" and gqa_answer("the dog") == "the dog"
    assert [pope_answer(t) for t in ("Yes", "No, there is not.", "There is no dog.", "Not sure.", "no")] == [
        "yes",
        "no",
        "no",
        "yes",
        "no",
    ]  # fmt: skip  ("Not" is not in eval_pope.py's list)
    from eve_ds.tasks.evlm_bench.data import BenchQuestion

    labels = ["yes", "no", "yes", "no", "yes"]
    preds = ["Yes", "No, there is not.", "There is no dog.", "yes", "Yes, a cat."]  # TP 2, FP 1, TN 1, FN 1
    qs = [BenchQuestion(str(i), i, "", "", (a,), {"sampler": "random"}) for i, a in enumerate(labels)]
    m = SCORERS["pope"](qs, {str(i): p for i, p in enumerate(preds)})
    assert m["pope_acc"] == pytest.approx(0.6) and m["pope_yes_ratio"] == pytest.approx(0.6)
    assert m["pope_precision"] == pytest.approx(2 / 3) and m["pope_recall"] == pytest.approx(2 / 3)
    assert m["pope_f1"] == pytest.approx(2 / 3) and m["pope_random_acc"] == m["pope_acc"]


def test_mme_acc_plus_and_the_perception_sum():
    from eve_ds.tasks.evlm_bench.data import BenchQuestion

    assert [mme_answer(t) for t in ("Yes, it is", "nope", "I think yes", "NO")] == [
        "yes",
        "no",
        "other",
        "no",
    ]
    rows = [("color", "1", "yes", "Yes"), ("color", "1", "no", "No"),  # image 1: both right
            ("color", "2", "yes", "no"), ("color", "2", "no", "No"),  # image 2: one right
            ("code_reasoning", "9", "yes", "maybe"), ("code_reasoning", "9", "no", "no")]  # fmt: skip
    qs = [BenchQuestion(str(i), i, "", "", (gt,), {"category": c, "image": im}) for i, (c, im, gt, _) in
          enumerate(rows)]  # fmt: skip
    m = SCORERS["mme"](qs, {str(i): r[3] for i, r in enumerate(rows)})
    assert (m["mme_color_acc"], m["mme_color_acc_plus"], m["mme_color_score"]) == (75.0, 50.0, 125.0)
    assert m["mme_code_reasoning_score"] == 50.0  # acc 50 + acc+ 0
    assert (m["mme_perception"], m["mme_cognition"]) == (125.0, 50.0)


def test_mmbench_letters_and_circular_eval(roots):
    opts = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}
    assert [option_letter(t, opts) for t in ("B", "(C) a bird", "The answer is D.", "It is a dog", "I")] == [
        "B", "C", "D", "B", ""]  # fmt: skip
    qs = READERS["mmbench"](str(roots["mmbench"]), None)
    right = {q.key: q.answers[0] for q in qs}
    m = SCORERS["mmbench"](qs, right)
    assert (m["mmbench_acc"], m["mmbench_acc_single"], m["mmbench_questions"]) == (1.0, 1.0, 2)
    # Question 0 right in its first pass, wrong in rotation 2: it no longer counts.
    m = SCORERS["mmbench"](qs, right | {str(2 * CIRCULAR): "A"})
    assert (m["mmbench_acc"], m["mmbench_acc_single"]) == (0.5, 1.0)
    assert m["mmbench_acc/attribute_recognition"] == 0.0 and m["mmbench_acc/object_localization"] == 1.0


# -- eve-evaluate on a tiny trained run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """evlm_tiny_synthetic for 4 steps (stage 0: 2): its frozen LM is RUN/lm, a 4 x 128 Qwen2 with the
    task's word-level tokenizer, both written with save_pretrained."""
    run, cache = tmp_path_factory.mktemp("evlm_run"), tmp_path_factory.mktemp("evlm_cache")
    overrides = {"data.cache_dir": cache, "task.synthetic_num_train": 64, "task.synthetic_num_val": 8,
                 "train.micro_batch_size": 4, "train.global_batch_size": 4, "train.max_steps": 4,
                 "train.eval_every": 1000, "train.checkpoint_every": 4, "train.deterministic": "true",
                 "optim.warmup_steps": 1, "optim.lr": 3e-3, "stage0.max_steps": 2, "stage0.batch_size": 4}  # fmt: skip
    argv = [
        "--config",
        "evlm_tiny_synthetic",
        "--run-dir",
        str(run),
        *(f"{k}={v}" for k, v in overrides.items()),
    ]
    assert pretrain_main(argv) == 0
    assert (run / "lm" / "tokenizer.json").is_file() and (run / "lm" / "config.json").is_file()
    return run


def test_evaluate_evlm_synthetic_scores_what_the_run_validated(run, tmp_path):
    out = tmp_path / "metrics.json"
    assert evaluate_main(["--task", "evlm_synthetic", "--checkpoint", str(run), "--output", str(out)]) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    got = json.loads(out.read_text())
    assert {"cider", "vqa_colour", "pope_acc", "caption_lm_loss_blind"} <= set(got)
    assert got == {k: v for k, v in final.items() if k in got} and len(got) > 40
    # Another batch size goes through eve-evaluate's own path (not the run's validation): same scores.
    again = tmp_path / "again.json"
    args = ["--task", "evlm_synthetic", "--checkpoint", str(run), "--output", str(again), "--batch-size", "3"]
    assert evaluate_main([*args, "--predictions", str(tmp_path / "unused")]) == 0
    assert json.loads(again.read_text())["vqa"] == got["vqa"]


def evaluate(run: Path, name: str, root: Path, tmp_path: Path, *extra: str) -> tuple[dict, list]:
    out, preds = tmp_path / f"{name}.json", tmp_path / f"{name}.predictions"
    argv = ["--task", name, "--checkpoint", str(run), "--data-root", str(root), "--output", str(out),
            "--predictions", str(preds), *extra]  # fmt: skip
    assert evaluate_main(argv) == 0
    text = preds.read_text()
    records = json.loads(text) if name == "vqav2" else [json.loads(line) for line in text.splitlines()]
    return json.loads(out.read_text()), records


def test_pope_end_to_end_scores_its_predictions_and_skips_an_unreadable_image(run, tmp_path):
    root = tmp_path / "pope"
    pope(root, bad=True)
    m, records = evaluate(run, "pope", root, tmp_path)
    assert (m["num_questions"], m["num_scored"], m["num_bad_images"]) == (7, 6, 1)
    assert [r["question_id"] for r in records] == [1, 2, 3, 1, 2, 1, 2]
    assert records[2]["prediction"] is None and all(isinstance(r["prediction"], str) for r in records[3:])
    # The metric is the official one of the answers written: recomputed from the file, it is the same.
    labels = [r["answers"][0] for r in records if r["prediction"] is not None]
    parsed = [pope_answer(r["prediction"]) for r in records if r["prediction"] is not None]
    hits = sum(p == t for p, t in zip(parsed, labels))
    assert m["pope_acc"] == pytest.approx(hits / 6)
    assert m["pope_yes_ratio"] == pytest.approx(parsed.count("yes") / 6)
    # Rows decoded one at a time give the same answers as rows decoded together.
    _, alone = evaluate(run, "pope", root, tmp_path / "b1", "--batch-size", "1")
    assert [r["prediction"] for r in alone] == [r["prediction"] for r in records]


@pytest.mark.parametrize("name", ["vqav2", "gqa", "textvqa", "mme", "mmbench"])
def test_each_benchmark_end_to_end(run, roots, tmp_path, name):
    m, records = evaluate(run, name, roots[name], tmp_path)
    main = {"vqav2": "vqa_score", "gqa": "gqa_acc", "textvqa": "textvqa_acc", "mme": "mme_perception",
            "mmbench": "mmbench_acc"}[name]  # fmt: skip
    assert main in m and m["num_bad_images"] == 0
    assert m["num_questions"] == len(records) == len(READERS[name](str(roots[name]), None))
    if name == "vqav2":  # the EvalAI file
        assert sorted(r["question_id"] for r in records) == [10, 20]
        expected = sum(vqa_accuracy(r["answer"], [a] * 10) for r, a in zip(records, ["red", "yes"])) / 2
        assert m["vqa_score"] == pytest.approx(expected)
    elif name == "gqa":
        hits = [gqa_answer(r["prediction"]) == r["answers"][0] for r in records]
        assert m["gqa_acc"] == pytest.approx(sum(hits) / 2)
    elif name == "textvqa":
        assert m["textvqa_acc"] == pytest.approx(
            textvqa_accuracy(records[0]["prediction"], records[0]["answers"])
        )
    elif name == "mme":
        assert m["mme_perception_categories"] == 2 and m["mme_perception"] == pytest.approx(
            m["mme_artwork_score"] + m["mme_color_score"]
        )
    else:
        assert m["mmbench_questions"] == 2 and 0.0 <= m["mmbench_acc"] <= m["mmbench_acc_single"]


def test_a_benchmark_without_its_files_is_one_line_naming_them(run, tmp_path, capsys):
    argv = ["--task", "gqa", "--checkpoint", str(run), "--data-root", str(tmp_path)]
    assert evaluate_main(argv) != 0
    err = capsys.readouterr().err
    assert "testdev_balanced_questions.json does not exist" in err and "Traceback" not in err


def test_a_question_is_media_tokens_prompt_and_its_image_as_the_model_reads_them(run, tmp_path):
    """Rebuilt by hand for one POPE question: K media ids + the prompt's ids, the image centre-cropped and
    ImageNet-normalised. The task's batch gives the same logits; another image changes them (the trained
    gates are open); greedy decoding of the hand-built row gives the answer eve-evaluate wrote."""
    import numpy as np
    import torch
    from PIL import Image
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers import PreTrainedTokenizerFast

    from eve_ds.train.evaluation import (
        EvalRequest,
        checkpoint_task,
        follow_run,
        load_checkpoint_model,
        run_config,
    )

    root = tmp_path / "pope"
    pope(root)
    _, records = evaluate(run, "pope", root, tmp_path, "--split", "random")
    model, config = load_checkpoint_model(str(run), device="cpu")
    backbone = model.encoder
    tok = PreTrainedTokenizerFast.from_pretrained(str(run / "lm"))
    K, S = backbone.cfg.num_media_tokens, backbone.cfg.image_size
    prompt = tok(f"Is there a ball?\n{SHORT_ANSWER}", add_special_tokens=False)["input_ids"]
    ids = [backbone.media_token_id] * K + prompt
    with Image.open(root / "val2014" / "COCO_val2014_000000000001.jpg") as img:  # 40 x 30: the centre 30 x 30
        rgb = img.convert("RGB").resize((S, S), Image.BILINEAR, box=(5, 0, 35, 30))
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[
        :, None, None
    ]
    zeros = torch.zeros(1, len(ids), dtype=torch.long)  # every token reads image slot 0
    hand = {"input_ids": torch.tensor([ids]), "lo": zeros, "hi": zeros, "images": x[None],
            "image_slot": torch.zeros(1, 2, dtype=torch.long), "num_slots": 1}  # fmt: skip

    run_cfg = run_config(config)
    request = follow_run(EvalRequest(task="pope", data_root=str(root)), run_cfg)
    task = checkpoint_task(model, config, request, run_cfg)
    task.prepare()
    q = task.questions("random")[0]
    with torch.no_grad():
        ours = backbone(
            task.batch(backbone, [task.question_docs(q.prompt)], [task.load(q.image)], "cpu")
        ).logits
        expected = backbone(hand).logits
        blue = backbone({**hand, "images": torch.zeros_like(x)[None] + 0.5}).logits
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)
    assert (blue - expected).abs().max() > 1e-2  # measured 0.35 (and 3.6e-7 between the two above)
    out = backbone.generate_greedy(hand, 8, tok.eos_token_id)[0].tolist()
    out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    assert records[0]["prediction"] == tok.decode(out, skip_special_tokens=True).strip()


def test_prompt_formats_lay_the_question_out_around_its_image(run, tmp_path, capsys):
    """plain: [media] prompt; sft: [media] user: prompt assistant: (the SFT rows' layout); chat: the
    tokenizer's template around it, the image opening the user turn; chat without a template: one line."""
    from transformers import PreTrainedTokenizerFast

    from eve_ds.train.evaluation import EvalRequest, checkpoint_task, load_checkpoint_model, run_config

    root = tmp_path / "pope"
    pope(root)
    model, config = load_checkpoint_model(str(run), device="cpu")

    def task_for(fmt: str | None):
        request = EvalRequest(task="pope", data_root=str(root), prompt_format=fmt)
        task = checkpoint_task(model, config, request, run_config(config))
        task.prepare()
        return task

    auto, sft = task_for(None), task_for("sft")
    assert auto.prompt_format == "plain"  # a stage1 run
    tok = auto.tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    assert auto.question_docs("is it red ?") == [{"image": 0}, {"text": ids("is it red ?")}]
    assert sft.question_docs("is it\nred ?") == [
        {"image": 0}, {"text": ids("user:") + ids(" is it red ?") + ids(" assistant:")}
    ]  # fmt: skip
    chat = task_for("plain")
    chat.prompt_format = "chat"
    chat.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(run / "lm"))
    chat.tokenizer.chat_template = "{% for m in messages %}user: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}"
    assert chat.question_docs("is it red ?") == [
        {"text": ids("user: ")}, {"image": 0}, {"text": ids("is it red ?") + ids(" answer:")}
    ]  # fmt: skip
    # Every format decodes end to end; a tokenizer without a chat template is named in one line.
    m, _ = evaluate(run, "pope", root, tmp_path / "sft", "--prompt-format", "sft")
    assert m["num_scored"] > 0 and m["num_bad_images"] == 0
    out = tmp_path / "chat.json"
    argv = ["--task", "pope", "--checkpoint", str(run), "--data-root", str(root), "--prompt-format", "chat"]
    assert evaluate_main([*argv, "--output", str(out)]) != 0
    err = capsys.readouterr().err
    assert (
        "task.bench_prompt=chat: the tokenizer of" in err
        and "no chat template" in err
        and "Traceback" not in err
    )
