"""The ablation tool (Tables 5 and 6 at small scale): the budget arithmetic, the aggregation and the table
on hand-made numbers, and `--quick` end to end (every task set pre-trained and fine-tuned for a few steps),
including that a rerun reuses the finished runs."""

from __future__ import annotations

import contextlib
import json
import logging
import math

import pytest

from eve_ds.cli.ablations import main
from eve_ds.repro.ablations.runner import budget_steps, rate_from_windows
from eve_ds.repro.ablations.spec import TASK_SETS
from eve_ds.repro.ablations.summary import claim_checks, make_row, markdown, mean_std
from eve_ds.repro.paper import TABLE5
from eve_ds.train.run_dir import RunDir


def test_rate_ignores_the_first_window_and_budget_pays_its_startup_once():
    # 10 steps in 8 s (3 s of it start-up), then 2 steps/s.
    rate, startup = rate_from_windows([(10, 8.0), (10, 5.0), (20, 10.0)])
    assert rate == pytest.approx(2.0)
    assert startup == pytest.approx(3.0)
    assert budget_steps(60.0, rate, startup) == 114  # (60 - 3) * 2
    assert budget_steps(1.0, rate, 5.0) == 1  # never zero steps
    with pytest.raises(ValueError, match="2 logged windows"):
        rate_from_windows([(10, 8.0)])


def test_loop_windows_reads_metrics_jsonl(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  global_batch_size: 16\n")
    recs = [
        {"step": 10, "loss": 1.0, "samples_per_s": 40.0},  # 160 samples / 40 = 4 s
        {"step": 10, "val/loss": 1.0},  # validation: no window
        {"step": 15, "loss": 1.0, "samples_per_s": 80.0},  # last, shorter window: 80 samples -> 1 s
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert RunDir(tmp_path).windows() == [(10, 4.0), (5, 1.0)]


def test_mean_std_and_rows():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([0.5]) == (0.5, 0.0)
    row = make_row([], None, {"vqa_score": [0.4, 0.6], "nlvr2_acc": [0.5, 0.5], "r_mean": [30.0, 40.0]})
    assert row["task_set"] == [] and row["label"] == "no pre-training"
    assert row["pretrain_steps"] == 0 and row["pretrain_seconds"] == 0.0
    assert row["vqa_score"] == pytest.approx(0.5) and row["vqa_score_std"] == pytest.approx(math.sqrt(0.02))
    assert row["nlvr2_acc_std"] == 0.0
    assert row["per_seed"]["r_mean"] == [30.0, 40.0]


def _rows(values: dict[tuple[str, ...], float]) -> list[dict]:
    pre = {"run_dir": "x", "pretrain_seconds": 100.0, "pretrain_steps": 200, "pretrain_steps_per_s": 2.0}
    return [
        make_row(list(ts), pre, {"vqa_score": [v, v], "nlvr2_acc": [v, v], "r_mean": [100 * v, 100 * v]})
        for ts, v in values.items()
    ]


def test_claims_and_markdown_on_hand_made_numbers():
    # The paper's Table 5 order except that MIM beats the joint-masked run.
    vals = {("mlm", "mim_pixel"): 0.7, ("mlm",): 0.6, ("mim_pixel",): 0.55, ("msm_joint",): 0.5}
    vals[("mlm", "itc", "itm", "mim_pixel")] = 0.65
    rows = _rows(vals)
    claims = {(c["claim"][:7], c["metric"]): c for c in claim_checks(rows)}
    assert not claims["Table 5", "vqa_score"]["holds"]
    assert claims["Table 5", "vqa_score"]["values"] == [0.7, 0.6, 0.5, 0.55]
    assert claims["Table 6", "r_mean"]["holds"] and claims["Table 6", "r_mean"]["resolved"]
    rows[1]["vqa_score_std"] = 0.2  # MLM's VQA spread now covers its gaps to both neighbours
    assert not {c["metric"]: c for c in claim_checks(rows) if c["claim"].startswith("Table 5")}["vqa_score"][
        "resolved"
    ]
    rows[1]["vqa_score_std"] = 0.0
    text = markdown(
        {
            "rows": rows,
            "budget_s": 150.0,
            "pretrain_seed": 0,
            "seeds": [0, 1],
            "finetune_steps": {"vqa": 10},
            "claims": claim_checks(rows),
            "paper_source": "src",
            "command": "cmd",
        }
    )
    table5 = text.split("## Table 5")[1].split("## Table 6")[0]
    ours = "200 | 100 | 70.0 ± 0.0 | 70.0 ± 0.0 | 70.0 ± 0.0"
    # The paper's cells: NLVR2 dev, test-P, Flickr30K TR@1, IR@1, VQA dev of each table's row.
    assert f"| MLM + MIM (EVE) | {ours} | 79.7 | 80.1 | 93.9 | 80.7 | 77.3 |" in table5
    assert (
        "| MIM | 200 | 100 | 55.0 ± 0.0 | 55.0 ± 0.0 | 55.0 ± 0.0 | 57.2 | 57.4 | 30.4 | 22.9 | 60.9 |"
        in table5
    )
    assert "ITC" not in table5
    table6 = text.split("## Table 6")[1].split("## The paper")[0]
    assert f"| MLM + MIM (EVE) | {ours} | — | — | 94.4 | 81.2 | 77.4 |" in table6  # NLVR2: not in Table 6
    assert "65.0 ± 0.0 | 65.0 ± 0.0 | 65.0 ± 0.0 | — | — | — | — | — |" in table6  # its row is not known
    assert rows[2]["paper"]["table5"]["row"] == "Table 5, row MIM only"
    assert set(rows[0]["paper"]) == {"table5", "table6"}
    assert "-> does not hold\n" in text and "-> holds (within the spread)" not in text


@contextlib.contextmanager
def runner_messages():
    """The ablation runner's log messages (the in-process trainer replaces the root logger's handlers, so
    this listens on the runner's own logger)."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("eve_ds.repro.ablations")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)


@pytest.mark.slow  # ~80 s: 28 short training runs
def test_quick_end_to_end_and_rerun_reuses_runs(tmp_path):
    out = tmp_path / "out"
    assert main(["--quick", "--out", str(out)]) == 0
    result = json.loads((out / "ablations-cpu.json").read_text())
    assert (out / "ablations-cpu.md").read_text().startswith("# Pre-training ablations")
    rows = result["rows"]
    assert [r["task_set"] for r in rows] == [ts for _, ts in TASK_SETS]
    for r in rows:
        for k in ("pretrain_seconds", "pretrain_steps", "vqa_score", "nlvr2_acc", "r_mean"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (r["task_set"], k)
        assert 0 <= r["vqa_score"] <= 1 and 0 <= r["nlvr2_acc"] <= 1 and 0 <= r["r_mean"] <= 100
        assert len(r["per_seed"]["vqa_score"]) == len(result["seeds"]) == 1
        if r["task_set"]:
            assert r["pretrain_steps"] >= 1 and r["pretrain_seconds"] > 0
        else:
            assert r["pretrain_steps"] == 0 and r["pretrain_seconds"] == 0
    assert {c["claim"][:7] for c in result["claims"]} == {"Table 5", "Table 6"}
    assert {tuple(ts) for ts in TABLE5} <= {tuple(r["task_set"]) for r in rows}

    finals = sorted((out / "runs").rglob("final_metrics.json"))
    assert len(finals) == 5 + 6 * 3  # pre-training runs + fine-tunes
    stamps = {p: p.stat().st_mtime_ns for p in finals}
    with runner_messages() as seen:
        assert main(["--quick", "--out", str(out)]) == 0
    assert any(m.startswith("ablation plan:") for m in seen)
    assert not any(m.startswith("run: ") for m in seen)  # nothing re-ran
    assert {p: p.stat().st_mtime_ns for p in finals} == stamps
    again = json.loads((out / "ablations-cpu.json").read_text())
    assert [r["vqa_score"] for r in again["rows"]] == [r["vqa_score"] for r in rows]
