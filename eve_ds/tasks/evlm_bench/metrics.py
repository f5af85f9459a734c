"""The benchmarks' official metrics, as functions of generated answers and the ground truth.

- VQAv2: the official VQA accuracy (`tasks/vqa/eval.py`), per answer type.
- GQA: exact match of the answer with its final periods removed and lower-cased (LLaVA's
  convert_gqa_for_eval.py, then the official eval.py's `predicted == gold`).
- TextVQA: the answer and the 10 human answers through the EvalAI answer processor (lower case, "," and "?"
  dropped, "'s" split off, then the VQA punctuation / number-word / article / contraction rules, always:
  unlike VQAv2's evaluation, which normalises only when the annotators disagree), then the mean over the
  10 leave-one-out subsets of min(1, matches / 3) (TextVQAAccuracyEvaluator of mmf / LLaVA's m4c_evaluator).
- POPE: an answer is "no" when its first sentence has the word "no", "No" or "not", else "yes" (LLaVA's
  eval_pope.py); accuracy, precision, recall and F1 of "yes", and the share of "yes", per sampler.
- MME: an answer is "yes" or "no" when it is one, else when its first 4 characters (lower case) contain
  "yes" (then "no"), else "other" (wrong); per category acc (questions right) and acc+ (images with both
  questions right), each x 100, the category's score their sum; perception = the sum over its 10
  categories, cognition over its 4 (the MME eval_tool's calculation.py).
- MMBench: the option letter an answer names (`option_letter`; no ChatGPT matching), CircularEval: a
  question counts as right only if every rotation of its options is answered right (MMBench's rule).
"""

from __future__ import annotations

import re
from collections import defaultdict
from types import SimpleNamespace

from eve_ds.tasks.evlm_bench.data import MME_COGNITION, MME_PERCEPTION, BenchQuestion
from eve_ds.tasks.evlm_synthetic.metrics import pope_scores
from eve_ds.tasks.vqa.eval import process_digit_article, process_punctuation, score_predictions


def gqa_answer(text: str) -> str:
    return text.strip().rstrip(".").lower()


def gqa_scores(questions: list[BenchQuestion], preds: dict[str, str]) -> dict:
    hits = [gqa_answer(preds[q.key]) == q.answers[0] for q in questions]
    return {"gqa_acc": sum(hits) / len(hits)}


def evalai_answer(text: str) -> str:
    """The EvalAI answer processor: "The Two Dogs!" -> "2 dogs", "Joe's" -> "joe 's"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def textvqa_accuracy(pred: str, answers: list[str] | tuple[str, ...]) -> float:
    gts = [evalai_answer(a) for a in answers]
    pred = evalai_answer(pred)
    matches = sum(a == pred for a in gts)
    return sum(min(1.0, (matches - (a == pred)) / 3) for a in gts) / len(gts)


def textvqa_scores(questions: list[BenchQuestion], preds: dict[str, str]) -> dict:
    accs = [textvqa_accuracy(preds[q.key], q.answers) for q in questions]
    return {"textvqa_acc": sum(accs) / len(accs)}


def vqav2_scores(questions: list[BenchQuestion], preds: dict[str, str]) -> dict:
    examples = [SimpleNamespace(question_id=q.question_id, answers=q.answers, **q.meta) for q in questions]
    out = score_predictions({q.question_id: preds[q.key] for q in questions}, examples)
    return {k: v for k, v in out.items() if "/qtype/" not in k}


def pope_answer(text: str) -> str:
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(questions: list[BenchQuestion], preds: dict[str, str]) -> dict:
    out = {}
    for sampler in sorted({q.meta["sampler"] for q in questions}):
        mine = [q for q in questions if q.meta["sampler"] == sampler]
        out |= pope_scores([pope_answer(preds[q.key]) for q in mine], [q.answers[0] for q in mine],
                           f"pope_{sampler}")  # fmt: skip
    out |= pope_scores([pope_answer(preds[q.key]) for q in questions], [q.answers[0] for q in questions])
    return out


def mme_answer(text: str) -> str:
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_scores(questions: list[BenchQuestion], preds: dict[str, str]) -> dict:
    """-> mme_<category>_{acc,acc_plus,score} (x 100), mme_perception, mme_cognition (sums of scores)."""
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for q in questions:
        per_image[q.meta["category"], q.meta["image"]].append(mme_answer(preds[q.key]) == q.answers[0])
    out, totals = {}, {"mme_perception": 0.0, "mme_cognition": 0.0}
    for category in sorted({c for c, _ in per_image}):
        images = [hits for (c, _), hits in per_image.items() if c == category]
        acc = 100 * sum(map(sum, images)) / sum(map(len, images))
        acc_plus = 100 * sum(all(h) for h in images) / len(images)
        out |= {f"mme_{category}_acc": acc, f"mme_{category}_acc_plus": acc_plus}
        out[f"mme_{category}_score"] = acc + acc_plus
        part = "mme_perception" if category in MME_PERCEPTION else "mme_cognition"
        totals[part] += acc + acc_plus
    present = {c for c, _ in per_image}
    totals["mme_perception_categories"] = len(present & set(MME_PERCEPTION))
    totals["mme_cognition_categories"] = len(present & set(MME_COGNITION))
    return {**totals, **out}


def option_letter(text: str, options: dict[str, str]) -> str:
    """The option an answer names: a leading letter ("B", "B.", "(B) ..."), else the first standalone
    capital letter of an option, else the one option whose text it contains; "" when none."""
    text = text.strip()
    m = re.match(r"^\(?([A-Z])(?:[\s.):,]|$)", text)
    if m and m.group(1) in options:
        return m.group(1)
    for m in re.finditer(r"\b([A-Z])\b", text):
        if m.group(1) in options:
            return m.group(1)
    named = [c for c, o in options.items() if o and o.lower() in text.lower()]
    return named[0] if len(named) == 1 else ""


def mmbench_scores(questions: list[BenchQuestion], preds: dict[str, str]) -> dict:
    """CircularEval over the groups of rotations (`mmbench_acc`, overall and per category), and the first
    pass alone (`mmbench_acc_single`: rotation 0 of every question)."""
    groups: dict[int, list[bool]] = defaultdict(list)
    category: dict[int, str] = {}
    single = []
    for q in questions:
        hit = option_letter(preds[q.key], q.meta["options"]) == q.answers[0]
        groups[q.meta["group"]].append(hit)
        category[q.meta["group"]] = q.meta["category"]
        if q.question_id == q.meta["group"]:
            single.append(hit)
    out = {"mmbench_acc": sum(all(h) for h in groups.values()) / len(groups)}
    out["mmbench_acc_single"] = sum(single) / len(single) if single else 0.0
    out["mmbench_questions"] = len(groups)
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for g, hits in groups.items():
        by_cat[category[g]].append(all(hits))
    out |= {f"mmbench_acc/{c}": sum(h) / len(h) for c, h in sorted(by_cat.items()) if c}
    return out


SCORERS = {
    "vqav2": vqav2_scores,
    "gqa": gqa_scores,
    "textvqa": textvqa_scores,
    "pope": pope_metrics,
    "mme": mme_scores,
    "mmbench": mmbench_scores,
}
