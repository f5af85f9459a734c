"""The benchmarks' files as distributed, read into one list of questions each (`BenchQuestion`), with the
prompts of LLaVA-1.5's evaluation (llava/eval/*, the prompts its EVLM-era comparisons use):

    vqav2    v2_OpenEnded_mscoco_<subtype>_questions.json (+ v2_mscoco_<subtype>_annotations.json for val),
             val2014/ or test2015/COCO_<folder>_<id:012d>.jpg (split: val | test-dev | test; `tasks/vqa/data.py`)
    gqa      <split>_balanced_questions.json {qid: {"imageId", "question", "answer", ...}}, images/<imageId>.jpg
             (split: testdev | val)
    textvqa  TextVQA_0.5.1_<split>.json {"data": [{"question_id", "image_id", "question", "answers": [10]}]},
             train_images/<image_id>.jpg (val images are in train_images/; split: val)
    pope     coco_pope_<sampler>.json, JSON lines {"question_id", "image", "text", "label": "yes" | "no"},
             val2014/<image> (split: random | popular | adversarial | all)
    mme      <category>/images/*.jpg + <category>/questions_answers_YN/<image stem>.txt, or the images and
             their .txt side by side in <category>/; each .txt has lines "question<TAB>Yes|No" (14 categories);
             or the eval tool's eval_tool/Your_Results/<category>.txt, lines "image<TAB>question<TAB>Yes|No"
    mmbench  MMBench_<split>.tsv: index, question, hint, A, B, C, D, answer, category, image (base64) ...
             (split: DEV_EN | DEV_CN | ... or a .tsv file name)

Short-answer prompts end with "Answer the question using a single word or phrase."; MMBench's list the
options as "A. ..." lines after the hint and the question, then "Answer with the option's letter from the
given choices directly." A file or key that is missing is a one-line error naming it and what was expected.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from eve_ds.tasks.base import DATA_ROOT_HINT, MissingDataFile, TaskDataError, read_json_file

SHORT_ANSWER = "Answer the question using a single word or phrase."  # [official code] LLaVA-1.5
OPTION_LETTER = {
    "en": "Answer with the option's letter from the given choices directly.",  # [official code] LLaVA-1.5
    "cn": "请直接回答选项字母。",
}
POPE_SAMPLERS = ("random", "popular", "adversarial")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MMBENCH_OPTIONS = ("A", "B", "C", "D", "E", "F", "G", "H", "I")
CIRCULAR = 1_000_000  # MMBench: rotation k of question i has index i + k * CIRCULAR (as VLMEvalKit's files)


@dataclass
class BenchQuestion:
    """One question: `key` unique in its benchmark, `image` a path or the encoded bytes, `prompt` the text
    after the image, `answers` the ground truth (10 for VQAv2 / TextVQA, one otherwise, () without),
    `meta` what the benchmark's metric groups by (category, sampler, options, ...)."""

    key: str
    question_id: int | str
    image: str | bytes
    prompt: str
    answers: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


def _need(obj, name: str, kind: type, where: str):
    """obj[name], which must be a `kind`; else a one-line error naming `where` and the field."""
    if not isinstance(obj, dict) or name not in obj:
        has = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise TaskDataError(f'{where}: expected a field "{name}" (has {has})')
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TaskDataError(f'{where}: field "{name}" must be {kind.__name__}, got {value!r:.60}')
    return value


def _need_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise MissingDataFile(f"{path} does not exist: expected {what} (check {DATA_ROOT_HINT})")
    return path


def _need_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise MissingDataFile(f"image folder {path} does not exist: expected {what} (check {DATA_ROOT_HINT})")
    return path


def short(question: str) -> str:
    return f"{question.strip()}\n{SHORT_ANSWER}"


def read_vqav2(root: str, split: str | None) -> list[BenchQuestion]:
    """VQA v2 through the EVE task's reader (its checks and messages); a missing image is kept (the
    evaluation counts it unreadable): the test-dev results file must answer every question."""
    from eve_ds.tasks.vqa.data import read_vqa

    examples, _ = read_vqa(root, split or "val", missing_ok=True)
    return [
        BenchQuestion(str(ex.question_id), ex.question_id, ex.image_path, short(ex.question), ex.answers,
                      {"answer_type": ex.answer_type, "question_type": ex.question_type})
        for ex in examples
    ]  # fmt: skip


def read_gqa(root: str, split: str | None) -> list[BenchQuestion]:
    split = split or "testdev"
    path = _need_file(os.path.join(root, f"{split}_balanced_questions.json"), f"GQA's {split} questions")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TaskDataError(
            f"{path}: expected a JSON object {{question id: question}}, got {type(obj).__name__}"
        )
    images = _need_dir(os.path.join(root, "images"), "GQA's images/<imageId>.jpg")
    out = []
    for qid, q in obj.items():
        where = f"{path}: question {qid}"
        image = _need(q, "imageId", str, where)
        out.append(BenchQuestion(qid, qid, os.path.join(images, f"{image}.jpg"),
                                 short(_need(q, "question", str, where)), (_need(q, "answer", str, where),)))  # fmt: skip
    return out


def read_textvqa(root: str, split: str | None) -> list[BenchQuestion]:
    split = split or "val"
    path = _need_file(os.path.join(root, f"TextVQA_0.5.1_{split}.json"), f"TextVQA's {split} annotations")
    folder = _need_dir(os.path.join(root, "test_images" if split == "test" else "train_images"),
                       "TextVQA's <image_id>.jpg")  # fmt: skip
    out = []
    for i, q in enumerate(read_json_file(path, "data", TaskDataError)):
        where = f"{path}: data[{i}]"
        qid = _need(q, "question_id", int, where)
        answers = (
            tuple(q.get("answers") or ()) if split == "test" else tuple(_need(q, "answers", list, where))
        )
        image = os.path.join(folder, f"{_need(q, 'image_id', str, where)}.jpg")
        out.append(BenchQuestion(str(qid), qid, image, short(_need(q, "question", str, where)), answers))
    return out


def read_pope(root: str, split: str | None) -> list[BenchQuestion]:
    """POPE's three files (or one sampler's); question ids restart per file, so a key is sampler/id."""
    samplers = POPE_SAMPLERS if split in (None, "all") else (split,)
    if not set(samplers) <= set(POPE_SAMPLERS):
        raise TaskDataError(f"POPE split={split!r}: expected one of {[*POPE_SAMPLERS, 'all']}")
    folder = _need_dir(os.path.join(root, "val2014"), "COCO val2014 images (POPE's)")
    out = []
    for sampler in samplers:
        path = _need_file(os.path.join(root, f"coco_pope_{sampler}.json"), "POPE's JSON lines")
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
        for n, line in lines:
            where = f"{path}:{n}"
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: not a JSON line ({e})") from None
            qid, label = _need(q, "question_id", int, where), _need(q, "label", str, where).lower()
            if label not in ("yes", "no"):
                raise TaskDataError(f'{where}: "label" must be yes or no, got {label!r}')
            image = os.path.join(folder, _need(q, "image", str, where))
            out.append(BenchQuestion(f"{sampler}/{qid}", qid, image, short(_need(q, "text", str, where)),
                                     (label,), {"sampler": sampler}))  # fmt: skip
    return out


def _mme_images(root: str, category: str) -> tuple[str, str]:
    """(image folder, question folder) of a category: images/ + questions_answers_YN/, or one folder."""
    base = os.path.join(root, category)
    if os.path.isdir(os.path.join(base, "images")):
        return os.path.join(base, "images"), os.path.join(base, "questions_answers_YN")
    return base, base


def _mme_rows(root: str, category: str) -> list[tuple[str, str, list[str]]]:
    """(image file name, where, [question, answer]) of a category, in order: from the eval tool's
    eval_tool/Your_Results/<category>.txt (lines image<TAB>question<TAB>answer) when the root has it,
    else from the release's one .txt per image (lines question<TAB>answer, named by the image's stem)."""
    listed = os.path.join(root, "eval_tool", "Your_Results", f"{category}.txt")
    if os.path.isfile(listed):
        with open(listed, encoding="utf-8") as f:
            lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        return [(r[0], f"{listed}:{n + 1}", r[1:]) for n, r in enumerate(lines)]
    images, qa = _mme_images(root, category)
    names = {os.path.splitext(n)[0]: n for n in os.listdir(images) if not n.endswith(".txt")}
    out = []
    for name in sorted(n for n in os.listdir(qa) if n.endswith(".txt")):
        with open(os.path.join(qa, name), encoding="utf-8") as f:
            lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        image = names.get(name[:-4], f"{name[:-4]}.jpg")
        out += [(image, f"{os.path.join(qa, name)}:{n + 1}", r) for n, r in enumerate(lines)]
    return out


def _mme_category(root: str, category: str) -> list[BenchQuestion]:
    images, _ = _mme_images(root, category)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for image, where, row in _mme_rows(root, category):
        if len(row) != 2 or row[1].strip().lower() not in ("yes", "no"):
            raise TaskDataError(f"{where}: expected 'question<TAB>Yes|No' after the image, got {row!r:.80}")
        stem = os.path.splitext(image)[0]
        key = f"{category}/{stem}/{seen[stem]}"
        seen[stem] += 1
        meta = {"category": category, "image": stem}
        out.append(
            BenchQuestion(
                key, key, os.path.join(images, image), short(row[0]), (row[1].strip().lower(),), meta
            )
        )
    return out


def read_mme(root: str, split: str | None) -> list[BenchQuestion]:
    """Every category folder of MME's release that is present (at least one)."""
    present = [c for c in (*MME_PERCEPTION, *MME_COGNITION) if os.path.isdir(os.path.join(root, c))]
    if not present:
        raise MissingDataFile(
            f"{root}: no MME category folder (expected some of {[*MME_PERCEPTION, *MME_COGNITION]}, "
            f"MME_Benchmark_release_version's layout; check {DATA_ROOT_HINT})"
        )
    return [q for c in present for q in _mme_category(root, c)]


def mmbench_file(root: str, split: str | None) -> str:
    split = split or "DEV_EN"
    name = split if split.endswith(".tsv") else f"MMBench_{split.upper()}.tsv"
    return _need_file(os.path.join(root, name), "MMBench's TSV (index, question, A, B, ..., image)")


def _mmbench_rows(path: str) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes long
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for key in ("index", "question", "A", "B", "image"):
        if rows and key not in rows[0]:
            raise TaskDataError(f"{path}: expected a column {key!r} (has {sorted(rows[0])})")
    return rows


def _present(value: str | None) -> bool:
    return value is not None and value.strip() != "" and value.strip().lower() not in ("nan", "none")


def read_mmbench(root: str, split: str | None) -> list[BenchQuestion]:
    """MMBench's TSV. A file without rotations gets them here (option lists rotated by 1..n-1, indices
    i + k * CIRCULAR), as LLaVA's --all-rounds: the metric is CircularEval either way."""
    path = mmbench_file(root, split)
    rows = _mmbench_rows(path)
    by_index = {r["index"]: r for r in rows}
    lang = "cn" if "CN" in os.path.basename(path).upper() else "en"
    out = []
    rotated = any(int(r["index"]) >= CIRCULAR for r in rows)
    for n, r in enumerate(rows):
        where = f"{path}: row {n + 2} (index {r['index']})"
        options = [r[o].strip() for o in MMBENCH_OPTIONS if _present(r.get(o))]
        image = r["image"] if len(r["image"]) > 64 else by_index.get(r["image"], {}).get("image", "")
        try:  # a short image field names the row whose image it shares
            data = base64.b64decode(image, validate=True)
        except ValueError:
            raise TaskDataError(f"{where}: column 'image' is not base64") from None
        answer = r.get("answer", "").strip()
        if answer and answer not in MMBENCH_OPTIONS[: len(options)]:
            raise TaskDataError(f"{where}: answer {answer!r} is not one of its options' letters")
        for k in range(1 if rotated else len(options)):
            out.append(_mmbench_question(r, int(r["index"]) + k * CIRCULAR, options, answer, k, data, lang))
    return out


def _mmbench_question(row: dict, index: int, options: list[str], answer: str, k: int, image: bytes,
                      lang: str) -> BenchQuestion:  # fmt: skip
    """Rotation k of a row: option j moves to letter (j - k) mod n; the answer letter with it."""
    n = len(options)
    shown = options[k:] + options[:k]
    letters = MMBENCH_OPTIONS[:n]
    moved = letters[(letters.index(answer) - k) % n] if answer else ""
    question = row["question"].strip()
    if _present(row.get("hint")):
        question = f"{row['hint'].strip()}\n{question}"
    lines = [question, *(f"{c}. {o}" for c, o in zip(letters, shown)), OPTION_LETTER[lang]]
    meta = {
        "group": index % CIRCULAR,
        "options": dict(zip(letters, shown)),
        "category": row.get("category", ""),
    }
    return BenchQuestion(str(index), index, image, "\n".join(lines), (moved,) if moved else (), meta)


READERS = {
    "vqav2": read_vqav2,
    "gqa": read_gqa,
    "textvqa": read_textvqa,
    "pope": read_pope,
    "mme": read_mme,
    "mmbench": read_mmbench,
}
