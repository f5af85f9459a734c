"""A synthetic VQA v2: questions about shapes scenes, written in VQA v2's official layout.

Each image is a scene of `eve_ds.data.synthetic`; QUESTIONS_PER_IMAGE questions are asked about it, each
from a different template (those that fit the scene, in a random order):

    colour          "what color is the circle?"                          -> "red"           other
    shape           "what shape is the red object?"                      -> "circle"        other
    size            "what size is the blue square?"                      -> "small"         other
    count           "how many shapes are there?", "... large shapes ..." -> "2"             number
    exists          "is there a green triangle?"                         -> yes / no (p=.5) yes/no
    relation        "is the red circle to the left of the blue square?"  -> yes / no (p=.5) yes/no
    relation_what   "what is to the left of the blue square?"            -> "circle"        other

Ten annotator answers per question: mostly the answer in its canonical (normalised) spelling, some in
other spellings that the official evaluation normalises to it ("two", "Yes!", "the red", "2."), and 0-3
distractors ("3", "no", "blue"), so the official normalisation matters. `question_type` is the longest
official question type the question starts with, as in the real files ("what shape is the ..." -> "what");
each annotation also names its `template` (an extra field the reader ignores).

Written files (read by `eve_ds.tasks.vqa.data.read_vqa`, like the real data set):

    v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json
    v2_mscoco_{train2014,val2014}_annotations.json
    train2014/COCO_train2014_%012d.jpg, val2014/..., test2015/...   (test-dev: the first half of test)
    synthetic.json                                                  the parameters; written last

Image `index` of `split` is a pure function of (seed, split, index, image_size), drawn from scene seeds
[seed, 1000 + split, index] that pre-training ([seed, 0 or 1, index]) never uses. Image ids are
ID_BASE[split] + index, question ids image_id * 1000 + k, as in VQA v2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
from PIL import Image

from eve_ds.data.scene_text import TEMPLATES, Scene, _pick
from eve_ds.data.synthetic import make_scene, render
from eve_ds.tasks.vqa.data import SPLITS, annotations_path, image_path, questions_path
from eve_ds.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

VERSION = 1  # bump when the generator changes, so cached data sets are regenerated
SPLIT_IDS = {"train": 1000, "val": 1001, "test": 1002}
ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
MAX_IMAGES = 1_000_000  # per split, so the id ranges stay apart
QUESTIONS_PER_IMAGE = 5
NUM_ANSWERS = 10
# The official question types (GT-Vision-Lab/VQA QuestionTypes/mscoco_question_types.txt).
_OFFICIAL_QUESTION_TYPES = (
    "how many|is the|what|what color is the|what is the|is this|is this a|what is|are the|what kind of|"
    "is there a|what type of|is it|what are the|where is the|is there|does the|what color are the|are these|"
    "are there|which|is|what is the man|is the man|are|how|does this|what is on the|what does the|"
    "how many people are|what is in the|what is this|do|what are|are they|what time|what sport is|"
    "are there any|is he|what color is|why|where are the|what color|who is|what animal is|is the woman|"
    "is this an|do you|how many people are in|what room is|has|is this person|what is the woman|can you|"
    "why is the|is the person|what is the color of the|what is the person|could|was|is that a|"
    "what number is|what is the name|what brand|none of the above"
)
OFFICIAL_QUESTION_TYPES = tuple(_OFFICIAL_QUESTION_TYPES.split("|"))
_DIGIT_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three"}


def question_type(question: str) -> str:
    """The longest official question type that `question` starts with (whole words)."""
    words = question.lower().rstrip("?").split()
    fits = [t for t in OFFICIAL_QUESTION_TYPES if words[: len(t.split())] == t.split()]
    return max(fits, key=len) if fits else "none of the above"


def spellings(answer: str, answer_type: str) -> list[str]:
    """Other ways annotators write `answer` that the official normalisation maps back to it."""
    if answer_type == "number":
        word = _DIGIT_WORDS.get(int(answer), answer)
        return [word, word.capitalize(), f"{answer}."]
    if answer_type == "yes/no":
        return [answer.capitalize(), f"{answer}.", f"{answer.capitalize()}!", answer.upper()]
    return [answer.capitalize(), f"{answer}.", f"the {answer}"]


def annotator_answers(
    rng: np.random.Generator, answer: str, answer_type: str, distractors: list[str]
) -> list[dict]:
    """NUM_ANSWERS raw answers: 0-3 distractors, 0-3 other spellings, the rest (>= 4) canonical."""
    num_wrong = int(rng.choice(4, p=[0.55, 0.25, 0.12, 0.08]))
    num_variants = int(rng.integers(0, 4))
    variants = spellings(answer, answer_type)
    raw = [(_pick(rng, distractors), "maybe") for _ in range(num_wrong)]
    raw += [(_pick(rng, variants), "yes") for _ in range(num_variants)]
    raw += [(answer, "yes")] * (NUM_ANSWERS - len(raw))
    order = rng.permutation(NUM_ANSWERS)
    return [
        {"answer": raw[o][0], "answer_confidence": raw[o][1], "answer_id": k + 1} for k, o in enumerate(order)
    ]


def synthetic_image(
    seed: int, split: str, index: int, image_size: int
) -> tuple[Scene, Image.Image, list[dict]]:
    """(scene, PIL image, questions) of image `index` of `split`; a pure function of its arguments.

    Each question: {"question", "answer", "answer_type", "template", "answers": [10 annotator dicts]}.
    """
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    scene = make_scene(rng, image_size)
    image = render(scene, rng, image_size)
    questions = []
    names = list(TEMPLATES)
    for t in rng.permutation(len(names)):
        made = TEMPLATES[names[t]](scene, rng)
        if made is None:
            continue
        question, answer, answer_type, distractors = made
        answers = annotator_answers(rng, answer, answer_type, distractors)
        questions.append(
            {
                "question": question,
                "answer": answer,
                "answer_type": answer_type,
                "template": names[t],
                "answers": answers,
            }
        )
        if len(questions) == QUESTIONS_PER_IMAGE:
            break
    return scene, image, questions


def _header(subtype: str) -> dict:
    return {
        "info": {"description": "synthetic VQA v2 (shapes scenes)", "version": f"synthetic-vqa-v{VERSION}"},
        "license": {"name": "generated", "url": ""},
        "data_subtype": subtype,
        "data_type": "mscoco",
    }


def _write_json(path: str, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


def _write_split(root: str, split: str, num_images: int, seed: int, image_size: int) -> list[dict]:
    """Images, questions file and (train, val) annotations file of `split`; returns the questions."""
    questions, annotations = [], []
    for index in range(num_images):
        image_id = ID_BASE[split] + index
        _, image, made = synthetic_image(seed, split, index, image_size)
        path = image_path(root, split, image_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # 4:4:4 chroma keeps the colours of small shapes from bleeding into the background.
        image.save(path, format="JPEG", quality=95, subsampling=0)
        for k, q in enumerate(made):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "answers": q["answers"],
                    "answer_type": q["answer_type"],
                    "question_type": question_type(q["question"]),
                    "multiple_choice_answer": q["answer"],
                    "template": q["template"],
                }
            )
    header = _header(SPLITS[split][0])
    _write_json(questions_path(root, split), {**header, "task_type": "Open-Ended", "questions": questions})
    if split != "test":
        _write_json(annotations_path(root, split), {**header, "annotations": annotations})
    return questions


def _check(sizes: dict[str, int], image_size: int) -> None:
    for split, num in sizes.items():
        if not 0 <= num <= MAX_IMAGES:
            raise ValueError(f"num_{split}_images={num}: expected 0 to {MAX_IMAGES}")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: expected at least 32 (the scenes' shapes must fit)")


def make_synthetic_vqa(
    root: str,
    *,
    seed: int,
    num_train_images: int,
    num_val_images: int,
    num_test_images: int,
    image_size: int = 64,
) -> str:
    """Write the data set into `root` (in place: use `ensure_synthetic_vqa` for a directory other processes
    may read); returns `root`."""
    sizes = {"train": num_train_images, "val": num_val_images, "test": num_test_images}
    _check(sizes, image_size)
    os.makedirs(root, exist_ok=True)
    for split, num in sizes.items():
        written = _write_split(root, split, num, seed, image_size)
    # test-dev: the questions of the first half of the test images (the same ids), as in VQA v2.
    dev_images = {ID_BASE["test"] + i for i in range((num_test_images + 1) // 2)}
    dev = [q for q in written if q["image_id"] in dev_images]  # `written`: the test split's, written last
    header = {**_header(SPLITS["test-dev"][0]), "task_type": "Open-Ended"}
    _write_json(questions_path(root, "test-dev"), {**header, "questions": dev})
    params = {"generator": f"synthetic-vqa-v{VERSION}", "seed": seed, "image_size": image_size}
    params.update(num_images=sizes, questions_per_image=QUESTIONS_PER_IMAGE, templates=list(TEMPLATES))
    atomic_write_json(os.path.join(root, "synthetic.json"), params)
    return root


def ensure_synthetic_vqa(
    cache_dir: str,
    *,
    seed: int,
    num_train_images: int,
    num_val_images: int,
    num_test_images: int,
    image_size: int = 64,
) -> str:
    """The data set's root under `cache_dir`, generated unless already there.

    Built in a temporary directory and renamed, so concurrent callers (several ranks) and interrupted
    runs never leave a half-made data set under the final name.
    """
    sizes = {"train": num_train_images, "val": num_val_images, "test": num_test_images}
    _check(sizes, image_size)
    name = f"synthetic-vqa-v{VERSION}-seed{seed}-" + "-".join(f"{s}{n}" for s, n in sizes.items())
    final = os.path.join(os.path.expanduser(cache_dir), f"{name}-px{image_size}")
    marker = os.path.join(final, "synthetic.json")
    if os.path.isfile(marker):
        return final
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating synthetic VQA v2 in %s", final)
    make_synthetic_vqa(
        tmp,
        seed=seed,
        num_train_images=num_train_images,
        num_val_images=num_val_images,
        num_test_images=num_test_images,
        image_size=image_size,
    )
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its data set is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(marker):
            raise RuntimeError(
                f"{final} exists but is not a complete synthetic VQA set (no synthetic.json)"
            ) from None
    return final
