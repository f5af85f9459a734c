"""NLVR2's metric: accuracy (overall and, on the synthetic set, per template) and the prediction file the
official evaluation script reads."""

from __future__ import annotations

from collections import defaultdict

from eve_ds.tasks.nlvr2.data import NLVR2Example
from eve_ds.tasks.nlvr2.synthetic import read_templates
from eve_ds.utils.io import atomic_write_text


def accuracy(examples: list[NLVR2Example], preds: dict[str, int | None]) -> float:
    return sum(preds[e.identifier] == e.label for e in examples) / max(1, len(examples))


def template_accuracy(root: str, split: str, examples: list[NLVR2Example], preds: dict) -> dict:
    """{"nlvr2_acc/<template>": accuracy} on a synthetic split (its lines name their template); {} else."""
    templates = read_templates(root, split)
    groups: dict[str, list[NLVR2Example]] = defaultdict(list)
    for e in examples:
        if e.identifier in templates:
            groups[templates[e.identifier]].append(e)
    return {f"nlvr2_acc/{t}": accuracy(group, preds) for t, group in sorted(groups.items())}


def write_predictions(path: str, examples: list[NLVR2Example], preds: dict) -> None:
    """NLVR2's prediction file, as the official evaluation script reads it: `identifier,True|False`."""
    lines = [f"{e.identifier},{bool(preds[e.identifier])}\n" for e in examples]
    atomic_write_text(path, "".join(lines))
