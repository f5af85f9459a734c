"""A run never loses work and its record never lies: Ctrl-C saves, a resume refuses changed settings
unless asked (and records them), a foreign run directory is refused before anything is written, user
errors are one line, and `eve-evaluate` on a run reproduces the run's own validation.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import complete_steps, env, run_train, small, train_losses

from eve_ds.train import EXIT_INTERRUPTED
from eve_ds.train.config import load_config
from eve_ds.train.engine import lr_lambda
from eve_ds.train.run_guard import check_resume, config_changes


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eve_cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir) -> tuple[Path, list[str]]:
    """A finished 4-step pre-training run on the synthetic corpus and the overrides that made it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    overrides = small(
        cache_dir, **{"train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 100}
    )
    result = run_train(run, overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    return run, overrides


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_config_changes_are_classified():
    saved = {"optim": {"lr": 1e-3}, "model": {"depth": 4}, "train": {"stop_after": None}}
    asked = {"optim": {"lr": 5e-3}, "model": {"depth": 4}, "train": {"stop_after": 2}}
    assert config_changes(saved, asked) == {"optim.lr": (1e-3, 5e-3), "train.stop_after": (None, 2)}
    with pytest.raises(ValueError, match=r"optim\.lr=0\.001, not 0\.005.*--allow-changes"):
        check_resume(saved, asked, allow_changes=False)
    assert check_resume(saved, asked, allow_changes=True) == config_changes(saved, asked)
    moved = {**asked, "model": {"depth": 6}}
    with pytest.raises(ValueError, match=r"model.depth \(run: 4, requested: 6\)"):
        check_resume(saved, moved, allow_changes=True)


def test_ctrl_c_saves_and_the_rerun_resumes_exactly(tmp_path, cache_dir):
    overrides = small(
        cache_dir,
        **{"train.max_steps": 8, "train.checkpoint_every": 100, "train.eval_every": 100},
        **{"train.deterministic": "true"},
    )
    ref = tmp_path / "ref"
    assert run_train(ref, overrides, one_thread=False).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eve_ds.cli.pretrain", "--run-dir", str(run), *overrides],
        env=env(one_thread=False),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and len(_lines(metrics)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "run the same command to resume" in err and "Traceback" not in err
    (step,) = complete_steps(run)
    assert 2 <= step < 8
    assert run_train(run, overrides, one_thread=False).returncode == 0
    assert train_losses(run) == train_losses(ref)


def test_resume_refuses_a_changed_lr_and_applies_it_when_allowed(tmp_path, finished):
    src, overrides = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = (run / "config.yaml").read_bytes()
    changed = [*overrides, "optim.lr=5e-3", "train.max_steps=6"]
    refused = run_train(run, changed)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr, refused.stderr
    assert last.startswith("eve-pretrain: error:") and "optim.lr" in last and "train.max_steps" in last
    assert (run / "config.yaml").read_bytes() == before

    applied = run_train(run, ["--allow-changes", *changed])
    assert applied.returncode == 0, applied.stderr[-2000:]
    cfg = load_config(str(run / "config.yaml"))
    assert (cfg.optim.lr, cfg.train.max_steps) == (5e-3, 6)
    (entry,) = json.loads((run / "config_changes.json").read_text())
    assert entry["step"] == 4 and entry["changes"]["optim.lr"] == [1e-3, 5e-3]
    logged = {r["step"]: r["lr"] for r in map(json.loads, _lines(run / "metrics.jsonl")) if "loss" in r}
    schedule = lr_lambda(cfg)
    for step in (5, 6):  # the LR a step applies is the schedule's at the steps done before it
        assert logged[step] == pytest.approx(5e-3 * schedule(step - 1), rel=1e-6)
    assert logged[4] == pytest.approx(1e-3 * lr_lambda(load_config(str(src / "config.yaml")))(3), rel=1e-6)


def test_a_foreign_run_dir_is_refused_and_left_untouched(tmp_path, finished):
    from eve_ds.cli.finetune import main as finetune

    run, _ = finished
    before = snapshot(run)
    assert finetune(["--run-dir", str(run), "train.init_from=none"]) == 2
    assert snapshot(run) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "paper.txt").write_text("mine")
    assert finetune(["--run-dir", str(other), "train.init_from=none"]) == 2
    assert snapshot(other) == {"paper.txt": b"mine"}


def test_a_broken_yaml_config_is_one_line_naming_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  flavor: [eve_tiny\n")
    result = subprocess.run(
        [sys.executable, "-m", "eve_ds.cli.pretrain", "--config", str(broken)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 3 and str(broken) in lines[-1] and "line" in lines[-1], result.stderr


def test_eve_evaluate_on_a_run_reproduces_its_final_validation(finished, capsys):
    from eve_ds.cli.evaluate import main as evaluate

    run, _ = finished
    assert evaluate(["--checkpoint", str(run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((run / "final_metrics.json").read_text())
    want = {k: v for k, v in final.items() if k != "step" and not k.startswith("train_")}
    assert got == want


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
