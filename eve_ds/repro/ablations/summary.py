"""The ablations' aggregation: mean and spread over the fine-tuning seeds per task set, the paper's
orderings checked against ours, and the markdown tables."""

from __future__ import annotations

import itertools
import statistics

from eve_ds.repro import paper
from eve_ds.repro.ablations.spec import FINETUNES, label
from eve_ds.repro.paper import TABLE5, TABLE6
from eve_ds.utils.markdown import table as md_table


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation of one value is 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def make_row(task_set: list[str], pre: dict | None, per_seed: dict[str, list[float]]) -> dict:
    row: dict = {"task_set": list(task_set), "label": label(task_set)}
    row.update(
        pre or {"run_dir": None, "pretrain_seconds": 0.0, "pretrain_steps": 0, "pretrain_steps_per_s": None}
    )
    for k, values in per_seed.items():
        row[k], row[f"{k}_std"] = mean_std(values)
    row["per_seed"] = per_seed
    row["paper"] = paper_cells(task_set)
    return row


def paper_cells(task_set: list[str] | tuple[str, ...]) -> dict:
    """The paper's rows for a task set: {"table5": {"row": "Table 5, row ...", "nlvr2/nlvr2_acc/dev": ...},
    ...}, one entry per table that has it (JSON-safe keys)."""
    out = {}
    for number, rows in paper.ABLATIONS.items():
        if (p := rows.get(tuple(task_set))) is not None:
            out[f"table{number}"] = {"row": p.where, **{"/".join(k): v for k, v in p.values.items()}}
    return out


def claim_checks(rows: list[dict]) -> list[dict]:
    """For each paper ordering and headline metric: does ours (by mean) follow it, and is every gap of the
    chain wider than the spreads (`resolved`; None with one seed: no spread)?"""
    by_set = {tuple(r["task_set"]): r for r in rows}
    out = []
    for name, chain in paper.ABLATION_CLAIMS:
        if not all(ts in by_set for ts in chain):
            continue
        for _, metric, _ in FINETUNES.values():
            rows_ = [by_set[ts] for ts in chain]
            if any(r.get(metric) is None for r in rows_):
                continue
            pairs = list(itertools.pairwise(rows_))
            out.append(
                {
                    "claim": name,
                    "metric": metric,
                    "values": [r[metric] for r in rows_],
                    "holds": all(a[metric] > b[metric] for a, b in pairs),
                    "resolved": _resolved(pairs, metric),
                }
            )
    return out


def _resolved(pairs: list[tuple[dict, dict]], metric: str) -> bool | None:
    """Every gap of the chain wider than the larger standard deviation of its two rows; None when a row
    has a single seed."""
    if any(len(r["per_seed"][metric]) < 2 for pair in pairs for r in pair):
        return None
    return all(abs(a[metric] - b[metric]) > max(a[f"{metric}_std"], b[f"{metric}_std"]) for a, b in pairs)


def _cell(row: dict, metric: str, scale: float) -> str:
    if row.get(metric) is None:
        return "—"
    return f"{row[metric] * scale:.1f} ± {row[f'{metric}_std'] * scale:.1f}"


# The paper's ablation columns as the tables' headers.
PAPER_HEADS = {
    "nlvr2/nlvr2_acc/dev": "paper NLVR2 dev",
    "nlvr2/nlvr2_acc/test-P": "paper NLVR2 test-P",
    "retrieval_flickr30k/tr_r1/test": "paper F30K TR@1",
    "retrieval_flickr30k/ir_r1/test": "paper F30K IR@1",
    "vqa/vqa_score/dev": "paper VQA dev",
}


def _paper(row: dict, table_number: int | None) -> list[str]:
    """The paper's cells for a row of one table, "—" where it gives none (or for the no-pre-training row)."""
    p = (row.get("paper") or {}).get(f"table{table_number}") or {}
    return ["—" if p.get(k) is None else f"{p[k]:g}" for k in PAPER_HEADS]


def table(
    rows: list[dict], task_sets: tuple[tuple[str, ...], ...] | None, table_number: int | None = None
) -> str:
    """The markdown table of the task sets in `task_sets` (None: all) plus the no-pre-training row, with
    the paper's cells from table `table_number` (None: no paper columns)."""
    heads = [m for _, m, _ in FINETUNES.values()]
    paper_heads = list(PAPER_HEADS.values()) if table_number is not None else []
    body = [
        [
            r["label"],
            r["pretrain_steps"],
            f"{r['pretrain_seconds']:.0f}",
            *(_cell(r, m, s) for _, m, s in FINETUNES.values()),
            *(_paper(r, table_number) if table_number is not None else []),
        ]
        for r in rows
        if task_sets is None or not r["task_set"] or tuple(r["task_set"]) in task_sets
    ]
    header = ["pre-training tasks", "steps", "loop s", *heads, *paper_heads]
    return md_table(header, body)


def markdown(result: dict) -> str:
    rows = result["rows"]
    steps = ", ".join(f"{t} {n}" for t, n in result["finetune_steps"].items())
    lines = [
        "# Pre-training ablations (EVE Tables 5 and 6), eve_tiny on the synthetic sets",
        "",
        f"Pre-training budget: {result['budget_s']:g} s of training loop per task set (seed "
        f"{result['pretrain_seed']}); fine-tuning: {steps} steps, seeds {result['seeds']}.",
        "",
        "## Table 5: which signals to mask",
        "",
        table(rows, TABLE5, 5),
        "",
        "## Table 6: masked signal modeling vs + ITC + ITM, same pre-training wall clock",
        "",
        table(rows, TABLE6, 6),
        "",
        "## The paper's orderings here",
        "",
    ]
    for c in result["claims"]:
        vals = " vs ".join(f"{v:.4g}" for v in c["values"])
        verdict = "holds" if c["holds"] else "does not hold"
        note = {None: " (one seed: no spread)", False: " (within the spread)", True: ""}[c["resolved"]]
        lines.append(f"- {c['claim']}, {c['metric']}: {vals} -> {verdict}{note}")
    lines += [
        "",
        "Mean ± sample standard deviation over the fine-tuning seeds (each pre-training ran once: the spread "
        "leaves out pre-training's own variance). VQA score and NLVR2 accuracy in percent, r_mean = mean of "
        "the six recalls (percent). `steps` / `loop s`: pre-training steps reached and the seconds its "
        "training loop took (from metrics.jsonl, start-up and final validation excluded). "
        f"Paper: {result['paper_source']}",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)
