"""`eve-bench-inference` on eve_tiny: the record's arithmetic, the parameter counts, the questions file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from eve_ds.bench.inference import VQA_TEST_DEV_QUESTIONS, InferenceBenchConfig, build_vqa_model
from eve_ds.cli.bench_inference import main
from eve_ds.data import load_tokenizer
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.info import count_parameters


def test_bench_inference_eve_tiny(tmp_path):
    qs = ["what color is the circle?", "how many squares are there in the picture?", "is it red?"]
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps({"questions": [{"question": q, "question_id": i} for i, q in enumerate(qs)]}))
    out, md = tmp_path / "t9.json", tmp_path / "t9.md"
    argv = ["--models", "eve_tiny", "--device", "cpu", "--batch-size", "3", "--num-batches", "1"]
    argv += ["--windows", "1", "--num-gpus", "8", "--questions", str(qfile)]
    assert main([*argv, "--json", str(out), "--markdown", str(md)]) == 0
    rec = json.loads(out.read_text())
    (row,) = rec["rows"]
    assert row["questions_per_s"] > 0
    minutes = VQA_TEST_DEV_QUESTIONS / row["questions_per_s"] / 60
    assert row["minutes_test_dev"] == pytest.approx(minutes, rel=1e-2, abs=0.01)  # rounded to 0.01
    assert row["minutes_on_gpus"] == pytest.approx(row["minutes_test_dev"] / 8, rel=1e-2, abs=0.01)
    tok = load_tokenizer("bert-base-uncased")
    assert row["mean_question_tokens"] == pytest.approx(
        sum(len(tok(q)["input_ids"]) for q in qs) / 3, abs=0.01
    )
    counts = count_parameters(build_vqa_model("eve_tiny", InferenceBenchConfig()))
    assert row["params_active_per_token"] == counts["params_active_per_token"]
    assert row["params_vqa_head"] == counts["params_heads"]
    assert {p["model"]: p["minutes"] for p in rec["paper"]} == {"ALBEF": 35.3, "VLMo": 21.6, "EVE-Base": 24.8}
    text = md.read_text()
    assert "| eve_tiny (cpu) |" in text and "EVE-Base (8 x V100)" in text and "24.8" in text


def test_active_parameters_count_top_k_experts_only():
    bc = InferenceBenchConfig()
    base = count_parameters(build_vqa_model("eve_tiny", bc))
    more = dataclasses.replace(get_config("eve_tiny"), num_experts=2 * get_config("eve_tiny").num_experts)
    obj = ObjectiveConfig(objectives=["vqa"], heads={"vqa": {"num_answers": bc.num_answers}})
    doubled = count_parameters(PretrainingModel(more, obj))
    assert doubled["params_experts"] == 2 * base["params_experts"]
    gate = more.hidden_size * more.num_experts // 2  # the router's extra rows
    assert doubled["params_active_per_token"] == base["params_active_per_token"] + gate * len(
        more.soft_blocks
    )
