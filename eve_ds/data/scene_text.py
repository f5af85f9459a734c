"""Text about a scene of `data/synthetic.py`, as pure functions of (scene, rng): the VQA templates of the
synthetic VQA v2, the paraphrased captions of the synthetic retrieval sets, POPE-style yes/no questions
about objects that are absent, and the grammar that reads a caption back into its objects.

    colour          "what color is the circle?"                          -> "red"
    shape           "what shape is the red object?"                      -> "circle"
    size            "what size is the blue square?"                      -> "small"
    count           "how many shapes are there?", "... large shapes ..." -> "2"
    exists          "is there a green triangle?"                         -> yes / no (p=.5)
    relation        "is the red circle to the left of the blue square?"  -> yes / no (p=.5)
    relation_what   "what is to the left of the blue square?"            -> "circle"

POPE (Li et al., 2023) asks "is there a {colour} {shape}?" about one present object (yes) and one absent
one (no), the absent one drawn by one of three samplers: `random` (any absent pair), `popular` (the absent
pairs most frequent among the first training scenes), `adversarial` (an absent pair sharing the colour or
the shape of a present object).

The synthetic VQA v2 (`tasks/vqa/synthetic.py`), the retrieval sets (`tasks/retrieval/synthetic.py`) and
EVLM's synthetic captions (`tasks/evlm_synthetic/`) all read their text from here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from eve_ds.data.synthetic import COLOURS, RELATIONS, SHAPES, SIZES, caption, make_scene

Scene = dict
# (question, canonical answer, answer type, distractor answers) or None when the template does not fit
Question = tuple[str, str, str, list[str]]
Template = Callable[[Scene, np.random.Generator], Question | None]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _others(value: str, values) -> list[str]:
    return [v for v in values if v != value]


def colour_question(scene: Scene, rng: np.random.Generator) -> Question:
    s = _pick(rng, scene["shapes"])
    return f"what color is the {s['shape']}?", s["colour"], "other", _others(s["colour"], COLOURS)


def shape_question(scene: Scene, rng: np.random.Generator) -> Question:
    s = _pick(rng, scene["shapes"])
    return f"what shape is the {s['colour']} object?", s["shape"], "other", _others(s["shape"], SHAPES)


def size_question(scene: Scene, rng: np.random.Generator) -> Question:
    s = _pick(rng, scene["shapes"])
    return f"what size is the {s['colour']} {s['shape']}?", s["size"], "other", _others(s["size"], SIZES)


def count_question(scene: Scene, rng: np.random.Generator) -> Question:
    size = _pick(rng, ["", *SIZES])
    n = sum(size in ("", s["size"]) for s in scene["shapes"])
    words = f"{size} shapes" if size else "shapes"
    return f"how many {words} are there?", str(n), "number", [str(m) for m in (n - 1, n + 1) if m >= 0]


def exists_question(scene: Scene, rng: np.random.Generator) -> Question:
    """Half yes, half no; a "no" names a colour or a shape of the scene, so one word alone never tells."""
    present = {(s["colour"], s["shape"]) for s in scene["shapes"]}
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present))
        answer = "yes"
    else:
        colours, shapes = {c for c, _ in present}, {k for _, k in present}
        absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
        near = [(c, k) for c, k in absent if c in colours or k in shapes]
        colour, shape = _pick(rng, near or absent)
        answer = "no"
    return f"is there a {colour} {shape}?", answer, "yes/no", _others(answer, ("yes", "no"))


def relation_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    """ "is the red circle to the left of the blue square?": the true relation or its opposite (p=.5)."""
    if not scene["relations"]:
        return None
    rel = _pick(rng, scene["relations"])
    subject, anchor = scene["shapes"][rel["subject"]], scene["shapes"][rel["object"]]
    yes = rng.random() < 0.5
    relation = rel["relation"] if yes else _INVERSE[rel["relation"]]
    answer = "yes" if yes else "no"
    question = f"is the {subject['colour']} {subject['shape']} {RELATIONS[relation]} the "
    question += f"{anchor['colour']} {anchor['shape']}?"
    return question, answer, "yes/no", _others(answer, ("yes", "no"))


def relation_what_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    """ "what is to the left of the blue square?" -> the shape of the only thing there."""
    by_relation: dict[str, list[int]] = {}
    for r in scene["relations"]:
        by_relation.setdefault(r["relation"], []).append(r["subject"])
    unique = [(rel, subjects[0]) for rel, subjects in sorted(by_relation.items()) if len(subjects) == 1]
    if not unique:
        return None
    relation, i = _pick(rng, unique)
    anchor, kind = scene["shapes"][1], scene["shapes"][i]["shape"]
    question = f"what is {RELATIONS[relation]} the {anchor['colour']} {anchor['shape']}?"
    return question, kind, "other", _others(kind, SHAPES)


TEMPLATES: dict[str, Template] = {
    "colour": colour_question,
    "shape": shape_question,
    "size": size_question,
    "count": count_question,
    "exists": exists_question,
    "relation": relation_question,
    "relation_what": relation_what_question,
}


# -- paraphrased captions ----

_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_RELATIVE = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
_COMPACT = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_COUNT = {2: "two", 3: "three"}


def _name(shape: dict, size: bool = True) -> str:
    colour_kind = f"{shape['colour']} {shape['shape']}"
    return f"{shape['size']} {colour_kind}" if size else colour_kind


def _listing(names: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _single_shape_paraphrases(shape: dict) -> list[str]:
    full, short = _name(shape), _name(shape, size=False)
    return [
        f"a {full}",
        f"there is a {full}",
        f"a scene with a single {short}",
        f"one {shape['size']} {shape['shape']} that is {shape['colour']}",
        f"a {short} on a dark background",
        f"a picture of a {full}",
    ]


def _multi_shape_paraphrases(scene: dict, rng: np.random.Generator) -> list[str]:
    """Captions of a 2- or 3-shape scene; relations all go from the other shapes to shapes[1]."""
    shapes = scene["shapes"]
    anchor = shapes[1]
    facts = [(shapes[r["subject"]], r["relation"]) for r in scene["relations"]]  # (subject, its relation)
    mentions = [[shapes[i] for i in rng.permutation(len(shapes))] for _ in range(2)]
    return [
        caption(scene),
        f"a {_name(anchor)} with " + " and ".join(f"a {_name(s)} {_RELATIVE[r]}" for s, r in facts),
        f"there is a {_name(anchor)}; "
        + "; ".join(f"a {_name(s, False)} is {_RELATIVE[r]}" for s, r in facts),
        "a scene with " + _listing([f"a {_name(s, False)}" for s in mentions[0]]),
        " and ".join(f"a {_name(s, False)} {_COMPACT[r]} a {_name(anchor, False)}" for s, r in facts),
        f"the {_name(anchor, False)} is "
        + " and ".join(f"{RELATIONS[_INVERSE[r]]} the {_name(s, False)}" for s, r in facts),
        f"{_COUNT[len(shapes)]} shapes on a dark background: "
        + _listing([f"a {_name(s)}" for s in mentions[1]]),
    ]


def paraphrases(scene: dict, rng: np.random.Generator) -> list[str]:
    """3 to 6 distinct true captions of `scene`, drawn from the templates in a random order."""
    shapes = scene["shapes"]
    candidates = (
        _single_shape_paraphrases(shapes[0]) if len(shapes) == 1 else _multi_shape_paraphrases(scene, rng)
    )
    n = int(rng.integers(3, 7))
    return [candidates[i] for i in rng.choice(len(candidates), n, replace=False)]


# -- POPE -------------------------------------------------------------------------------------------------

POPE_SAMPLERS = ("random", "popular", "adversarial")
POPULAR_FROM = 2000  # [ours] training scenes counted for the `popular` sampler's frequency ranking


@lru_cache(maxsize=4)
def popular_pairs(seed: int, image_size: int = 64) -> tuple[tuple[str, str], ...]:
    """Every (colour, shape) pair, most frequent first among the first POPULAR_FROM training scenes of the
    EVE corpus (seeds [seed, 0, i]); ties in a fixed order."""
    counts: Counter = Counter()
    for i in range(POPULAR_FROM):
        counts.update(
            (s["colour"], s["shape"])
            for s in make_scene(np.random.default_rng([seed, 0, i]), image_size)["shapes"]
        )
    pairs = [(c, k) for c in COLOURS for k in SHAPES]
    return tuple(sorted(pairs, key=lambda p: -counts[p]))


def absent_object(
    scene: Scene, rng: np.random.Generator, sampler: str, popular: tuple = ()
) -> tuple[str, str]:
    """A (colour, shape) that is not in the scene, drawn by `sampler` (POPE_SAMPLERS)."""
    present = {(s["colour"], s["shape"]) for s in scene["shapes"]}
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    if sampler == "random":
        return _pick(rng, absent)
    if sampler == "popular":
        ranked = [p for p in (popular or absent) if p not in present]
        return _pick(rng, ranked[:3])
    if sampler == "adversarial":
        near = [(c, k) for c, k in absent if any(c == pc or k == pk for pc, pk in present)]
        return _pick(rng, near or absent)
    raise ValueError(f"POPE sampler {sampler!r}: expected one of {POPE_SAMPLERS}")


def pope_questions(
    scene: Scene, rng: np.random.Generator, sampler: str, popular: tuple = ()
) -> list[tuple[str, str]]:
    """[(question, "yes"), (question, "no")]: a present object, then an absent one drawn by `sampler`."""
    s = _pick(rng, scene["shapes"])
    colour, shape = absent_object(scene, rng, sampler, popular)
    return [(f"is there a {s['colour']} {s['shape']}?", "yes"), (f"is there a {colour} {shape}?", "no")]


# -- reading captions back ----------------------------------------------------------------------------------


def objects(scene: Scene) -> set[tuple[str, str, str]]:
    """The scene's (size, colour, shape) triples."""
    return {(s["size"], s["colour"], s["shape"]) for s in scene["shapes"]}


def parse_objects(text: str) -> set[tuple[str, str, str]]:
    """The (size, colour, shape) triples a caption names: every run of three words size, colour, shape
    (the grammar of `data.synthetic.caption`), wherever it stands, so that the order does not matter."""
    w = text.replace("?", " ").replace(";", " ").replace(",", " ").split()
    return {
        (w[i], w[i + 1], w[i + 2])
        for i in range(len(w) - 2)
        if w[i] in SIZES and w[i + 1] in COLOURS and w[i + 2] in SHAPES
    }
