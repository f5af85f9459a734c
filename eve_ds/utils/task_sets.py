"""The one spelling of task sets on the command line (`eve-bench --task-sets`, `eve-ablations --task-sets`):
space-separated sets of comma-joined objective names, `none` for the empty set (no pre-training)::

    --task-sets mlm,mim_pixel mlm,itc,itm none

A `;` inside one argument separates sets too, so the older `--task-sets "mlm,mim_pixel;mlm,itc,itm"` keeps
working."""

from __future__ import annotations


def parse_task_set(text: str) -> list[str]:
    """'mlm,mim_pixel' -> ['mlm', 'mim_pixel']; 'none' -> [] (the no-pre-training row)."""
    text = text.strip()
    return [] if text == "none" else [t.strip() for t in text.split(",") if t.strip()]


def parse_task_sets(values: str | list[str]) -> list[list[str]]:
    """The arguments of `--task-sets` (one string or argparse's list) -> the task sets, in order."""
    items = [values] if isinstance(values, str) else values
    return [parse_task_set(group) for item in items for group in item.split(";") if group.strip()]


def format_task_sets(task_sets: list[list[str]]) -> str:
    """The inverse of parse_task_sets, for help texts: 'mlm,mim_pixel mlm none'."""
    return " ".join(",".join(ts) or "none" for ts in task_sets)
