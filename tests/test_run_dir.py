"""RunDir reads what the trainer writes; markdown.table writes the project's tables."""

from __future__ import annotations

import json

import pytest

from eve_ds.train.run_dir import RunDir
from eve_ds.utils.markdown import table


def test_run_dir_reads_records_windows_and_final(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_run() and run.records() == [] and run.final_metrics() is None
    (tmp_path / "config.yaml").write_text("train:\n  global_batch_size: 8\n")
    recs = [{"step": 10, "loss": 2.0, "samples_per_s": 40.0}, {"step": 10, "val/acc": 0.5}]
    recs.append({"step": 30, "loss": 1.0, "samples_per_s": 80.0})
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 31, "lo')  # a line being written
    assert run.is_run() and run.records() == recs
    assert [r["step"] for r in run.train_records()] == [10, 30]
    assert run.windows() == [(10, 2.0), (20, 2.0)]
    assert not run.is_finished()
    (tmp_path / "final_metrics.json").write_text('{"step": 30}')
    assert run.is_finished() and run.final_metrics() == {"step": 30}


def test_run_dir_refuses_a_corrupt_line_that_is_not_the_last(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 1"):
        RunDir(tmp_path).records()


def test_markdown_table():
    out = table(["a", "b"], [["x", 0.12345], ["y", None]])
    assert out.splitlines() == ["| a | b |", "|---|---:|", "| x | 0.123 |", "| y | – |"]
    with pytest.raises(ValueError, match="2 columns"):
        table(["a", "b"], [["x"]])
