"""The VQA score, computed as the official evaluation API computes it (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, at its last change "Fixed processing answers bug", 2021).

Per question, with the 10 annotator answers:

1. newlines and tabs become spaces and both ends are stripped, in the prediction and in every answer;
2. ONLY WHEN THE ANSWERS DISAGREE (more than one distinct string after step 1) are the prediction and the
   answers normalised (`normalize_answer`: punctuation, then number words -> digits, articles dropped,
   contractions restored). When all annotators wrote the same string the prediction must equal it as is:
   "Two" scores 0 against ten "2". The official code does this and the evaluation server runs it, so we do
   too; real annotations are lower case and predictions from `AnswerVocab` are normalised, so it rarely
   bites;
3. accuracy = the mean over the 10 leave-one-annotator-out subsets of min(1, #matches / 3), i.e. 0, 0.3,
   0.6, 0.9 or 1.0 for 0, 1, 2, 3 or more matching annotators (`soft_score`, the usual training target).

Quirks kept on purpose, because they are what the official numbers mean: the period regex
`(?!<=\\d)(\\.)(?!\\d)` has a typo (a look-ahead for "<=d", not a look-behind), so "2." loses its period but
so does "a.5"; `re.UNICODE` is passed where `re.sub` takes its count, so at most 32 periods are removed;
contraction keys with capitals ("Im") never match because the text was lower-cased before.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

from eve_ds.utils.io import atomic_write_text

# processPunctuation's list. Apostrophes are not in it ("don't" stays), nor are ":" and "." (handled below).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",")
PUNCTUATION += ("?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # only tested for: "1,000" -> punctuation is deleted, not spaced
_MAX_PERIODS = re.UNICODE  # = 32: the official call passes re.UNICODE as `count`

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
NUMBER_WORDS |= {"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official contractions map, as "written:restored" pairs.
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've
it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've
mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've
oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's
thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't
wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't
wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
"""
CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTION_PAIRS.split())

_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9)  # written out: 3 * 0.3 is 0.8999999999999999 in floating point


def clean(s: str) -> str:
    """Step 1 of the official evaluation: newlines and tabs -> spaces, ends stripped."""
    return s.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(s: str) -> str:
    """The official processPunctuation: each listed mark is deleted when some occurrence of it touches a
    space (or the text has a digit-comma-digit anywhere), else replaced by a space; then periods not
    followed by a digit are deleted."""
    out = s
    has_digit_comma = _COMMA_STRIP.search(s) is not None
    for p in PUNCTUATION:
        touches_space = p + " " in s or " " + p in s  # tested on the input, as the official code does
        out = out.replace(p, "" if touches_space or has_digit_comma else " ")
    return _PERIOD_STRIP.sub("", out, count=_MAX_PERIODS)


def process_digit_article(s: str) -> str:
    """The official processDigitArticle: lower case, number words -> digits, articles dropped, then
    contractions restored ("dont" -> "don't"), words joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(s: str) -> str:
    """An answer as the official evaluation compares it when annotators disagree: "Two." -> "2",
    "a dog" -> "dog", "dont" -> "don't". Also the key of `AnswerVocab`."""
    return process_digit_article(process_punctuation(clean(s)))


def soft_score(count: int) -> float:
    """The VQA accuracy of an answer given by `count` of 10 annotators: 0, 0.3, 0.6, 0.9, then 1.0.

    This is the official leave-one-out average in closed form (for 10 answers) rounded to one decimal,
    as the standard training targets (bottom-up-attention's `get_score`) are.
    """
    if count < 0:
        raise ValueError(f"count={count}: expected >= 0")
    return _SOFT_SCORES[count] if count < len(_SOFT_SCORES) else 1.0


def vqa_accuracy(pred: str, gt_answers: list[str] | tuple[str, ...]) -> float:
    """The official accuracy of prediction `pred` given the annotators' raw answers (usually 10)."""
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    gts = [clean(a) for a in gt_answers]
    pred = clean(pred)
    if len(set(gts)) > 1:  # the official code normalises only when the annotators disagree
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = sum(a == pred for a in gts)
    # Leaving out annotator i leaves `matches - (gts[i] == pred)` matching answers among the others.
    return sum(min(1.0, (matches - (a == pred)) / 3) for a in gts) / len(gts)


def _check_ids(preds: Mapping[int, str], ids: list[int], allow_missing: bool) -> int:
    """Number of examples without a prediction; raises on those (unless allowed) and on unknown ids."""
    known = set(ids)
    extra = [q for q in preds if q not in known]
    if extra:
        raise ValueError(
            f"{len(extra)} predictions for question ids not among the examples (first: {extra[0]})"
        )
    missing = [q for q in ids if q not in preds]
    if missing and not allow_missing:
        raise ValueError(
            f"{len(missing)} of {len(ids)} questions have no prediction (first: {missing[0]}); pass "
            "allow_missing=True to score them as wrong"
        )
    return len(missing)


def score_predictions(preds: Mapping[int, str], examples: Iterable, *, allow_missing: bool = False) -> dict:
    """Official VQA score of `preds` (question_id -> answer) over `examples` (objects with question_id,
    answers, answer_type, question_type, e.g. `data.VQAExample`; those without answers are ignored).

    -> {"vqa_score": mean accuracy (0-1), "vqa_score/<answer type>": per answer type ("vqa_score/yes/no",
    "vqa_score/number", "vqa_score/other"), "vqa_score/qtype/<question type>": per question type,
    "num_questions", "num_missing"}. Every example needs a prediction unless `allow_missing` (then an
    absent one scores 0, as a blank answer on the evaluation server would).
    """
    annotated = [ex for ex in examples if ex.answers]
    if not annotated:
        raise ValueError("no annotated examples to score (test splits have no answers)")
    num_missing = _check_ids(preds, [ex.question_id for ex in annotated], allow_missing)
    groups: dict[str, list[float]] = defaultdict(list)
    for ex in annotated:
        pred = preds.get(ex.question_id)
        acc = 0.0 if pred is None else vqa_accuracy(pred, ex.answers)
        groups["vqa_score"].append(acc)
        if ex.answer_type:
            groups[f"vqa_score/{ex.answer_type}"].append(acc)
        if ex.question_type:
            groups[f"vqa_score/qtype/{ex.question_type}"].append(acc)
    out = {key: sum(accs) / len(accs) for key, accs in sorted(groups.items())}
    out.update(num_questions=len(annotated), num_missing=num_missing)
    return out


def write_results(path: str, preds: Mapping[int, str], question_ids: Iterable[int], fallback: str) -> int:
    """Write the evaluation server's results file, [{"question_id", "answer"}] for EVERY id of
    `question_ids` (the server rejects incomplete files), atomically. Questions without a prediction
    (unreadable images) get `fallback`; returns how many did."""
    ids = list(question_ids)
    filled = sum(q not in preds for q in ids)
    results = [{"question_id": int(q), "answer": preds.get(q, fallback)} for q in ids]
    atomic_write_text(path, json.dumps(results, separators=(",", ":")))
    return filled
