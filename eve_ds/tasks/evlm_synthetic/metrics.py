"""The metrics of EVLM's synthetic evaluation, as functions of predictions and references.

- captions: CIDEr-D and BLEU-4 from `pycocoevalcap` (the COCO caption evaluation's own scorers, pure
  Python), over lower-cased whitespace words (the Java PTB tokenizer is not needed: the words are ours);
  object F1: the (size, colour, shape) triples a caption names (`data.scene_text.parse_objects`) against
  the scene's, counted over the whole set (micro F1), so the order of mention does not matter;
- VQA: exact match of the generated answer, per template;
- POPE: accuracy, precision, recall, F1 of "yes", and the share of "yes" answers (Li et al., 2023);
- grounding: the share of predicted boxes with IoU >= 0.5 against the true box (RefCOCO's accuracy) and
  the mean IoU, an unreadable answer counting as IoU 0.
"""

from __future__ import annotations

from collections import defaultdict


def caption_tokens(text: str) -> str:
    """What the scorers compare: lower case, punctuation as spaces, single spaces."""
    for p in ";,:.?!":
        text = text.replace(p, " ")
    return " ".join(text.lower().split())


def cider_bleu(predictions: dict, references: dict) -> dict:
    """predictions: {id: caption}; references: {id: [captions]} -> {"cider", "bleu4"}. CIDEr's document
    frequencies come from the references of the whole set: it needs at least two ids (0 otherwise)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [caption_tokens(v) or "<empty>"] for k, v in predictions.items()}
    gts = {k: [caption_tokens(r) for r in references[k]] for k in predictions}
    if len(res) < 2:
        return {"cider": 0.0, "bleu4": 0.0}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3])}


def object_f1(predicted: list[set], truth: list[set]) -> dict:
    """Micro precision / recall / F1 of predicted object sets against the true ones, pair by pair."""
    tp = sum(len(p & t) for p, t in zip(predicted, truth))
    n_pred, n_true = sum(len(p) for p in predicted), sum(len(t) for t in truth)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"object_f1": f1, "object_precision": precision, "object_recall": recall}


def exact_match(records: list[tuple[str, str, str]], prefix: str = "vqa") -> dict:
    """records: (group, predicted, answer) -> {prefix: overall accuracy, prefix_<group>: per group}."""
    hits: dict[str, list[int]] = defaultdict(list)
    for group, pred, answer in records:
        hits[group].append(int(pred == answer))
    out = {prefix: sum(map(sum, hits.values())) / max(1, sum(map(len, hits.values())))}
    out.update({f"{prefix}_{g}": sum(h) / len(h) for g, h in sorted(hits.items())})
    return out


def pope_scores(predicted: list[str], answers: list[str], prefix: str = "pope") -> dict:
    """POPE's numbers with "yes" as the positive class; an answer other than yes / no counts as "no"."""
    yes = [p == "yes" for p in predicted]
    pos = [a == "yes" for a in answers]
    tp = sum(y and t for y, t in zip(yes, pos))
    n = max(1, len(answers))
    precision = tp / sum(yes) if any(yes) else 0.0
    recall = tp / sum(pos) if any(pos) else 0.0
    return {
        f"{prefix}_acc": sum(y == t for y, t in zip(yes, pos)) / n,
        f"{prefix}_precision": precision,
        f"{prefix}_recall": recall,
        f"{prefix}_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        f"{prefix}_yes_ratio": sum(yes) / n,
    }


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1); a box with x1 < x0 or y1 < y0 is empty."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = [max(0.0, x[2] - x[0]) * max(0.0, x[3] - x[1]) for x in (a, b)]
    union = area[0] + area[1] - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(predicted: list[list[float] | None], truth: list[list[float]],
                     prefix: str = "grounding") -> dict:  # fmt: skip
    """predicted: a box per question (None: no box read from the answer) -> accuracy at IoU 0.5, mean IoU."""
    ious = [box_iou(p, t) if p is not None else 0.0 for p, t in zip(predicted, truth)]
    n = max(1, len(ious))
    return {f"{prefix}_acc": sum(i >= 0.5 for i in ious) / n, f"{prefix}_iou": sum(ious) / n}
