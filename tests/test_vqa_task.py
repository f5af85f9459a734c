"""VQA v2 through the shared trainer: `eve-finetune` on the synthetic set in the official layout, exact
resume after SIGKILL, two ranks with ep_size=2, the answer vocabulary through an export, and
`eve-evaluate --task vqa` with a complete EvalAI file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from eve_ds.cli.convert import main as convert
from eve_ds.cli.evaluate import main as evaluate
from eve_ds.cli.finetune import main as finetune
from eve_ds.tasks.vqa.data import read_vqa
from eve_ds.tasks.vqa.synthetic import ensure_synthetic_vqa

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vqa_cache")


def overrides(cache, **extra) -> list[str]:
    base = {
        "data.cache_dir": cache,
        "task.synthetic_num_train": 40,
        "task.synthetic_num_val": 12,
        "task.synthetic_num_test": 6,
        "task.minival_images": 6,
        "train.init_from": "none",
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.max_steps": 6,
        "train.checkpoint_every": 3,
        "train.log_every": 1,
        "data.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def test_finetune_writes_vqa_score_and_the_vocabulary_travels_with_exports(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert finetune(["--run-dir", str(run), *overrides(cache)]) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert 0.0 <= final["vqa_score"] <= 1.0 and final["num_questions"] == 6 * 5
    assert final["step"] == 6 and "train_vqa_loss" in final
    saved = json.loads((run / "checkpoints" / "step_00000006" / "eve_config.json").read_text())
    vocab = saved["task"]["answer_vocab"]
    assert saved["task"]["name"] == "vqa" and "yes" in vocab["answers"]
    export = tmp_path / "export"
    assert convert(["export", str(run), str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["task"]["answer_vocab"] == vocab

    root = ensure_synthetic_vqa(
        str(cache), seed=0, num_train_images=40, num_val_images=12, num_test_images=6, image_size=64
    )
    capsys.readouterr()
    assert (
        evaluate(
            ["--checkpoint", str(export), "--task", "vqa", "--data-root", root, "--split", "val", "--json"]
        )
        == 0
    )
    val = json.loads(capsys.readouterr().out)
    assert val["num_questions"] == 12 * 5 and 0.0 <= val["vqa_score"] <= 1.0


def test_evalai_file_answers_every_question_even_without_its_image(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert finetune(["--run-dir", str(run), *overrides(cache, **{"train.max_steps": 2})]) == 0
    src = ensure_synthetic_vqa(
        str(cache), seed=0, num_train_images=40, num_val_images=12, num_test_images=6, image_size=64
    )
    root = tmp_path / "vqa"
    shutil.copytree(src, root)  # the cached set stays intact
    questions, _ = read_vqa(str(root), "test-dev", missing_ok=True)
    os.remove(questions[0].image_path)  # one test-dev image is gone
    pred = tmp_path / "test-dev.json"
    capsys.readouterr()
    argv = ["--checkpoint", str(run), "--task", "vqa", "--data-root", str(root), "--split", "test-dev"]
    assert evaluate([*argv, "--predictions", str(pred), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    answers = json.loads(pred.read_text())
    assert sorted(a["question_id"] for a in answers) == sorted(q.question_id for q in questions)
    assert all(isinstance(a["answer"], str) and a["answer"] for a in answers)
    assert out["num_unreadable"] == 5  # the 5 questions of that image, answered with the top answer

    val, _ = read_vqa(str(root), "val")
    os.remove(val[0].image_path)  # and one val image: an error naming the flag, or left out and counted
    argv = ["--checkpoint", str(run), "--task", "vqa", "--data-root", str(root), "--split", "val", "--json"]
    capsys.readouterr()
    assert evaluate(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eve-evaluate: error: ") and "--skip-bad-images" in err[0]
    assert evaluate([*argv, "--skip-bad-images"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["num_missing"] == 5 and scored["num_questions"] == 12 * 5 - 5


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, cache):
    args = overrides(cache, **{"train.deterministic": "true", "data.num_workers": 1})
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "eve_ds.cli.finetune"]
    assert (
        subprocess.run([*cmd, "--run-dir", str(ref), *args], env=env(), capture_output=True).returncode == 0
    )
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--run-dir", str(run), *args, "train.stop_after=5"],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    complete = run / "checkpoints" / "step_00000003" / "eve_complete.json"
    deadline = time.time() + 300
    while not complete.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert complete.exists()
    done = subprocess.run([*cmd, "--run-dir", str(run), *args], env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    assert losses(run) == losses(ref) and len(losses(ref)) == 6
    assert len(set(losses(ref).values())) == 6


@pytest.mark.slow
def test_two_ranks_expert_parallel_finetune(tmp_path, cache):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    args = overrides(cache, **{"model.ep_size": 2, "train.max_steps": 3})
    proc = subprocess.run(
        [*cmd, "-m", "eve_ds.cli.finetune", "--run-dir", str(run), *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "expert-parallel 2 x expert-data-parallel 1" in proc.stderr
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["num_questions"] == 30 and 0.0 <= final["vqa_score"] <= 1.0
    tag = run / "checkpoints" / "step_00000003"
    assert len(list(tag.glob("layer_*_expert_*_model_states.pt"))) == 4
