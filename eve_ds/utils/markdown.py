"""Markdown tables: the one writer of the tables that benchmarks, reports and research scripts print."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def cell(value, digits: int = 3, none: str = "–") -> str:
    """A table cell: None -> `none`, floats rounded to `digits`, everything else as str."""
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(
    header: Sequence[str],
    rows: Iterable[Sequence],
    align: str | None = None,
    digits: int = 3,
    none: str = "–",
) -> str:
    """A GitHub markdown table. `align` holds one letter per column: l(eft), r(ight) or c(entre); default:
    the first column left, the others right. Cells go through `cell(value, digits, none)`."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align={align!r} has {len(align)} letters for {len(header)} columns")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(cell(v, digits, none) for v in row) + " |")
    return "\n".join(lines)
