"""slurm/reproduce.sh: the Table 2 chain (pre-training -> export -> COCO retrieval -> VQA, NLVR2, Flickr30K ->
evaluations -> report) and its report.

- the plan, the override scopes, what a rerun does (skip / wait / submit / fresh), the sbatch lines, and the
  report (rows, paper numbers, differences, stage status and hours, pre-training throughput) on fake run
  roots: no Slurm, no training;
- preflight: a bad data path or a mistyped key fails before anything is submitted;
- on the local one-node Slurm (marker `slurm`, the fixture of tests/test_slurm.py): the tiny chain with
  `--wait` completes with a row for every metric; the same command again submits nothing; a stage made to
  fail is named by --wait, and a rerun resubmits that stage and what depends on it, nothing else. About
  5-6 minutes on 2 shared cores, most of it the trainers' start-up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_slurm import REPO, cluster, job_env  # noqa: F401 (cluster: the session fixture)

from eve_ds.cli.reproduce import main as report_main
from eve_ds.cli.reproduce import reproduce_main
from eve_ds.repro.chain import plan as chain_plan
from eve_ds.repro.chain import report as chain_report
from eve_ds.repro.chain import slurm
from eve_ds.train.config import packaged_configs

SCRIPT = REPO / "slurm" / "reproduce.sh"
NAMES = [
    "pretrain",
    "export",
    "retrieval_coco",
    "vqa",
    "nlvr2",
    "retrieval_flickr",
    "eval_retrieval_coco",
    "eval_vqa",
    "eval_nlvr2",
    "eval_retrieval_flickr",
    "report",
]

# -- the plan -----------------------------------------------------------------------------------------


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_plan_order_dependencies_and_inits():
    stages = chain_plan.plan("base", "4m")
    assert [s.name for s in stages] == NAMES
    seen = set()
    for s in stages:  # dependency order: every stage after what it needs
        assert set(s.deps) <= seen, s.name
        seen.add(s.name)
    by = chain_plan.by_name(stages)
    assert by["retrieval_coco"].source == "export"
    assert {by[n].source for n in ("vqa", "nlvr2", "retrieval_flickr")} == {"retrieval_coco"}
    assert by["report"].deps == ("eval_retrieval_coco", "eval_vqa", "eval_nlvr2", "eval_retrieval_flickr")
    assert (by["pretrain"].config, by["pretrain"].script, by["pretrain"].gpus) == (
        "eve_base_4m",
        "slurm/pretrain_base.sh",
        16,
    )
    assert chain_plan.by_name(chain_plan.plan("large", "16m"))["pretrain"].config == "eve_large_16m"
    run = Path("/r")
    assert chain_plan.train_args(by["vqa"], run) == [
        "--config",
        "vqa_eve_base",
        "--run-dir",
        "/r/vqa",
        "train.init_from=/r/retrieval_coco",
    ]


def test_tiny_plan_uses_packaged_configs():
    stages = chain_plan.by_name(chain_plan.plan("tiny", "4m"))
    configs = {s.config for s in stages.values() if s.kind == "train"}
    assert configs <= set(packaged_configs()), configs - set(packaged_configs())
    assert "task.dataset=flickr30k" in stages["retrieval_flickr"].overrides
    assert "task.dataset=coco" in stages["retrieval_coco"].overrides
    assert all(s.gpus == 0 for s in stages.values())


def test_bad_size_and_corpus():
    with pytest.raises(chain_plan.PlanError, match=r"--size 'huge': expected one of"):
        chain_plan.plan("huge", "4m")
    with pytest.raises(chain_plan.PlanError, match="--size base --corpus 16m: no such pre-training"):
        chain_plan.plan("base", "16m")


def test_override_scopes():
    out = chain_plan.split_overrides(
        ["train.max_steps=3", "vqa:task.epochs=1", "finetune:data.num_workers=0"]
    )
    assert out["pretrain"] == ["train.max_steps=3"]
    assert out["vqa"] == ["train.max_steps=3", "task.epochs=1", "data.num_workers=0"]
    assert out["nlvr2"] == ["train.max_steps=3", "data.num_workers=0"]
    # A value with a colon is an ordinary global override.
    assert chain_plan.split_overrides(["data.cache_dir=s3://b:k"])["vqa"] == ["data.cache_dir=s3://b:k"]
    with pytest.raises(chain_plan.PlanError, match="no training stage 'vqa2'"):
        chain_plan.split_overrides(["vqa2:task.epochs=1"])
    with pytest.raises(chain_plan.PlanError, match="expected KEY=VALUE"):
        chain_plan.split_overrides(["train.max_steps"])
    with pytest.raises(chain_plan.PlanError, match=r"pretrain:train\.init_from=PATH"):
        chain_plan.split_overrides(["train.init_from=/x"])
    pre = chain_plan.by_name(chain_plan.plan("base", "4m", ["pretrain:train.init_from=/beit"]))["pretrain"]
    assert "train.init_from=/beit" in chain_plan.train_args(pre, Path("/r"))


def actions(complete=(), active=(), traces=()):
    stages = chain_plan.plan("tiny", "4m")
    return chain_plan.decide(
        stages,
        {n: n in complete for n in NAMES},
        {n: n in active for n in NAMES},
        {n: n in traces or n in complete for n in NAMES},
    )


def test_decide():
    assert set(actions(complete=NAMES).values()) == {"skip"}
    assert actions() == {n: "submit" for n in NAMES}
    # One fine-tune lost its final metrics: it and what depends on it, nothing else.
    a = actions(complete=[n for n in NAMES if n != "vqa"], traces=["vqa"])
    assert {n: x for n, x in a.items() if x != "skip"} == {
        "vqa": "submit",
        "eval_vqa": "fresh",
        "report": "fresh",
    }
    # Pre-training still queued from an earlier submission: wait for it, run everything after it.
    a = actions(active=["pretrain"], traces=["pretrain"])
    assert a["pretrain"] == "wait" and a["export"] == "submit" and a["report"] == "submit"


def test_set_aside_moves_stale_output(tmp_path):
    by = chain_plan.by_name(chain_plan.plan("tiny", "4m"))
    (tmp_path / "vqa" / "checkpoints").mkdir(parents=True)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "vqa_test-dev.json").write_text("{}")
    (moved,) = chain_plan.set_aside(by["vqa"], tmp_path)
    assert not (tmp_path / "vqa").exists() and (moved / "checkpoints").is_dir()
    (moved,) = chain_plan.set_aside(by["eval_vqa"], tmp_path)
    assert not (tmp_path / "eval" / "vqa_test-dev.json").exists() and moved.read_text() == "{}"
    assert chain_plan.set_aside(by["eval_nlvr2"], tmp_path) == []


def test_sbatch_lines():
    by = chain_plan.by_name(chain_plan.plan("tiny", "4m", ["train.max_steps=3"]))
    run, root = Path("/runs/t"), Path("/src")
    argv = slurm.sbatch_argv(by["vqa"], run, [11], "afterok", "/venv/python", root)
    assert argv[:2] == ["sbatch", "--parsable"]
    assert "--dependency=afterok:11" in argv and "--kill-on-invalid-dep=yes" in argv
    assert "--output=/runs/t/logs/vqa-%j.out" in argv and "--gpus-per-node=0" in argv
    i = argv.index("/src/slurm/finetune.sh")
    assert argv[i + 1 :] == [
        "--config",
        "vqa_tiny_synthetic",
        "--run-dir",
        "/runs/t/vqa",
        "train.init_from=/runs/t/retrieval_coco",
        "train.max_steps=3",
    ]
    argv = slurm.sbatch_argv(by["report"], run, [1, 2], "afterany", "/venv/python", root)
    assert "--dependency=afterany:1:2" in argv
    assert argv[-1].endswith("exec /venv/python -m eve_ds.cli.reproduce run-stage /runs/t report")
    assert not any(
        a.startswith("--dependency") for a in slurm.sbatch_argv(by["pretrain"], run, [], "afterok", "p", root)
    )


# -- the report on fake run roots ---------------------------------------------------------------------


def launch_log(path: Path, start: str, end: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"[launch {start}] job 5 restart 0\n0: training ...\n[launch {end}] trainer finished (exit 0)\n"
    )


def fake_root(root: Path, size: str = "base") -> Path:
    """A run root where pre-training ran in two attempts, VQA and NLVR2 finished, NLVR2 and COCO retrieval
    were evaluated, VQA's evaluation failed, COCO retrieval has no final metrics and Flickr30K never
    started."""
    chain_plan.write_plan(root, size, "4m", [])
    launch_log(root / "pretrain/logs/slurm-5.0.log", "2026-01-01T00:00:00", "2026-01-01T01:00:00")
    launch_log(root / "pretrain/logs/slurm-5.1.log", "2026-01-01T02:00:00", "2026-01-01T03:30:00")
    (root / "pretrain/final_metrics.json").write_text("{}")
    recs = [{"step": 50, "loss": 9.0, "samples_per_s": 100.0, "mfu": 0.9}]  # warm-up window: left out
    recs += [
        {"step": 100 + 50 * i, "loss": 8.0, "samples_per_s": s, "mfu": m}
        for i, (s, m) in enumerate([(3000.0, 0.30), (3300.0, 0.33), (3200.0, 0.32)])
    ]
    recs.append({"step": 250, "val/loss": 7.0})
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (root / "pretrain/metrics.jsonl").write_text(text + '{"step": 300, "loss": 7.9, "samp')  # being written
    (root / "vqa").mkdir()
    (root / "vqa/final_metrics.json").write_text(json.dumps({"vqa_score": 0.7712}))
    (root / "eval").mkdir()
    (root / "eval/nlvr2_dev.json").write_text(json.dumps({"nlvr2_acc": 0.8}))
    (root / "eval/nlvr2_test1.json").write_text(json.dumps({"nlvr2_acc": 0.81}))
    coco = {m: 50.0 + i for i, m in enumerate(chain_report.RECALLS)}
    (root / "eval/retrieval_coco_test.json").write_text(json.dumps(coco))
    (root / "retrieval_coco").mkdir()  # a run directory without final metrics: it failed or is running
    chain_plan.record_stage_run(root, "eval_nlvr2", start=time.time() - 360, rc=0)
    chain_plan.record_stage_run(root, "eval_vqa", start=time.time() - 36, rc=2)  # its job failed
    return root


def test_report_rows_paper_numbers_and_differences(tmp_path):
    report = chain_report.build_report(fake_root(tmp_path))
    rows = {(r["task"], r["metric"], r["split"]): r for r in report["rows"]}
    assert len(rows) == len(report["rows"]) == 5 + 2 * len(chain_report.RECALLS)
    assert report["paper_row"] == "Table 2, row EVE-Base (Ours) [4M]"
    assert rows["vqa", "vqa_score", "minival"]["value"] == 77.12  # percent
    test_dev = rows["vqa", "vqa_score", "test-dev"]  # scored by EvalAI, not here
    assert (test_dev["value"], test_dev["paper"], test_dev["diff"]) == (None, 78.0, None)
    assert "EvalAI" in test_dev["note"]
    assert rows["vqa", "vqa_score", "test-std"]["paper"] == 78.02
    assert rows["vqa", "vqa_score", "test-std"]["paper_models"] == {
        "base/4m": 78.02,
        "large/4m": 79.2,
        "large/16m": 80.18,
    }
    assert rows["vqa", "vqa_score", "minival"]["paper_models"] == dict.fromkeys(
        ("base/4m", "large/4m", "large/16m")
    )
    assert rows["nlvr2", "nlvr2_acc", "dev"] == {
        "task": "nlvr2",
        "metric": "nlvr2_acc",
        "split": "dev",
        "value": 80.0,
        "paper": 83.34,
        "diff": -3.34,
        "paper_models": {"base/4m": 83.34, "large/4m": 84.03, "large/16m": 85.63},
    }
    assert rows["nlvr2", "nlvr2_acc", "test-P"]["diff"] == pytest.approx(81.0 - 83.93)
    assert rows["retrieval_coco", "tr_r1", "test"] == {
        "task": "retrieval_coco",
        "metric": "tr_r1",
        "split": "test",
        "value": 50.0,
        "paper": 79.6,
        "diff": -29.6,
        "paper_models": {"base/4m": 79.6, "large/4m": 82.5, "large/16m": 83.5},
    }
    # The paper gives no EVE R@5 / R@10 / r_mean, for any model.
    for m in ("tr_r5", "tr_r10", "ir_r5", "ir_r10", "r_mean"):
        r = rows["retrieval_coco", m, "test"]
        assert r["paper"] is None and r["paper_models"] == dict.fromkeys(("base/4m", "large/4m", "large/16m"))
    assert rows["retrieval_flickr30k", "ir_r1", "test"] == {
        "task": "retrieval_flickr30k",
        "metric": "ir_r1",
        "split": "test",
        "value": None,
        "paper": 84.1,
        "diff": None,
        "paper_models": {"base/4m": 84.1, "large/4m": 86.3, "large/16m": 87.9},
    }


@pytest.mark.parametrize(
    ("size", "corpus", "where", "cells"),
    [
        ("large", "4m", "Table 4, row EVE-Large (Ours) [4M]", (79.25, 79.2, 84.69, 65.2, 96.3)),
        ("large", "16m", "Table 4, row EVE-Large (Ours) [16M]", (80.17, 80.18, 86.22, 66.7, 98.0)),
    ],
)
def test_report_paper_numbers_of_the_large_models(tmp_path, size, corpus, where, cells):
    report = chain_report.build_report(fake_root(tmp_path), size, corpus)
    rows = {(r["task"], r["metric"], r["split"]): r["paper"] for r in report["rows"]}
    keys = [
        ("vqa", "vqa_score", "test-dev"),
        ("vqa", "vqa_score", "test-std"),
        ("nlvr2", "nlvr2_acc", "test-P"),
        ("retrieval_coco", "ir_r1", "test"),
        ("retrieval_flickr30k", "tr_r1", "test"),
    ]
    assert report["paper_row"] == where and tuple(rows[k] for k in keys) == cells


def test_report_stages_hours_and_throughput(tmp_path):
    report = chain_report.build_report(fake_root(tmp_path))
    st = {s["name"]: s for s in report["stages"]}
    assert "report" not in st and len(st) == len(NAMES) - 1
    assert st["pretrain"]["status"] == "complete"
    assert st["pretrain"]["wall_hours"] == 2.5  # two attempts: 1 h + 1.5 h
    assert st["pretrain"]["gpu_hours"] == 2.5 * 16
    assert st["retrieval_coco"]["status"] == "incomplete"
    assert st["retrieval_flickr"] == {
        "name": "retrieval_flickr",
        "status": "not started",
        "wall_hours": None,
        "gpus": 8,
        "gpu_hours": None,
        "job_id": None,
    }
    assert st["eval_nlvr2"]["status"] == "complete" and st["eval_nlvr2"]["wall_hours"] == pytest.approx(
        0.1, abs=1e-3
    )
    assert st["eval_vqa"]["status"] == "failed"
    assert report["gpu_hours"] == pytest.approx(40.0 + 0.1 + 0.01, abs=1e-3)  # evaluations: 1 GPU each
    assert report["pretraining"] == {
        "pairs_per_s": 3200.0,
        "pairs_per_s_per_gpu": 200.0,
        "mfu": 0.32,
        "steps": 200,
    }


def test_tiny_report_has_no_paper_column(tmp_path):
    report = chain_report.build_report(fake_root(tmp_path, size="tiny"))
    assert all(r["paper"] is None and r["diff"] is None for r in report["rows"])
    assert report["paper_row"] is None
    assert any(r["value"] is not None for r in report["rows"])


def test_eve_report_writes_files_and_records_the_evalai_score(tmp_path, capsys):
    root = fake_root(tmp_path)
    assert report_main([str(root), "--vqa-test-dev", "77.5", "--vqa-test-std", "77.75"]) == 0
    out = capsys.readouterr().out
    assert "| vqa | vqa_score | test-dev | 77.50 | 78.00 | -0.50 | 78.00 | 79.25 | 80.17 |" in out
    assert "| vqa | vqa_score | test-std | 77.75 | 78.02 | -0.27 | 78.02 | 79.20 | 80.18 |" in out
    assert "Table 2, row EVE-Base (Ours) [4M]" in out
    saved = json.loads((root / "report.json").read_text())
    assert (root / "report.md").read_text() == chain_report.markdown(saved)
    assert saved["rows"][0]["value"] == 77.5 and saved["rows"][0]["diff"] == -0.5
    assert report_main([str(tmp_path / "nothing")]) == 2
    assert "not a run root of slurm/reproduce.sh" in capsys.readouterr().err


def test_preflight_fails_before_submitting(tmp_path, capsys, monkeypatch):
    """A missing data directory and a mistyped key: both reported, with the stage, nothing submitted."""
    monkeypatch.setenv("EVE_ROOT", str(REPO))
    run = tmp_path / "run"
    rc = reproduce_main(
        [
            "--size",
            "tiny",
            "--run-root",
            str(run),
            "--dry-run",
            "vqa:task.synthetic=false",
            f"vqa:task.data_root={tmp_path}/no_vqa",
            "nlvr2:train.max_stpes=3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 2, out
    assert f"vqa (--config vqa_tiny_synthetic): task.data_root='{tmp_path}/no_vqa': no such directory" in out
    assert re.search(r"nlvr2 \(--config nlvr2_tiny_synthetic\): .*max_stpes.*max_steps", out), out
    assert "nothing was submitted" in out and not run.exists()


# -- the chain on the local Slurm ---------------------------------------------------------------------

# Small enough for minutes on 2 CPUs: 3 optimizer steps per training stage, tiny synthetic sets, ITM
# re-ranking of the top 2 (of 8 test images).
TINY = [
    "train.max_steps=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.checkpoint_every=1000",
    "train.eval_every=1000",
    "train.log_every=1",
    "data.num_workers=0",
    "pretrain:data.synthetic_num_train=256",
    "pretrain:data.synthetic_num_val=16",
    "finetune:task.synthetic_num_train=40",
    "finetune:task.synthetic_num_val=8",
    "finetune:task.synthetic_num_test=8",
    "finetune:task.rerank_k=2",
    "vqa:task.minival_images=4",
]


def reproduce(
    conf: str, run: Path, cache: Path, *extra: str, timeout: float = 480
) -> subprocess.CompletedProcess:
    """slurm/reproduce.sh --size tiny --wait, as a user runs it. The jobs skip the launcher's own preflight
    (EVE_SKIP_PREFLIGHT=1: tests/test_slurm.py covers it; the chain's preflight is what runs here): one
    interpreter start-up less per training stage."""
    cmd = [str(SCRIPT), "--size", "tiny", "--run-root", str(run), "--wait", "--poll", "1"]
    cmd += [*TINY, f"data.cache_dir={cache}", *extra]
    env = job_env(conf, EVE_SKIP_PREFLIGHT="1")
    try:
        return subprocess.run(cmd, env=env, cwd=run.parent, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s:\n{e.stdout}")


def all_job_ids(conf: str) -> set[int]:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i"], env=job_env(conf), capture_output=True, text=True
    )
    return {int(x) for x in out.stdout.split()}


def submitted(r: subprocess.CompletedProcess) -> dict[str, int]:
    """{stage: job id} of the sbatch lines the driver printed."""
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"reproduce: (\w+)\s+job (\d+)(?: \(after|$)", r.stdout, re.M)
    }


def planned(r: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(re.findall(r"reproduce: (\w+)\s+(skip|wait|submit|fresh)$", r.stdout, re.M))


@pytest.fixture(scope="module")
def chain(cluster, tmp_path_factory):  # noqa: F811
    """The whole tiny chain, run once: (SLURM_CONF, run root, cache dir, the driver's result)."""
    base = tmp_path_factory.mktemp("reproduce")
    run, cache = base / "run", base / "cache"
    return cluster, run, cache, reproduce(cluster, run, cache)


@pytest.mark.slurm
@pytest.mark.slow
def test_chain_completes_with_a_row_per_metric(chain):
    _, run, _, r = chain
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert set(planned(r).values()) == {"submit"} and list(submitted(r)) == NAMES
    ids = submitted(r)
    assert "chain complete" in r.stdout
    report = json.loads((run / "report.json").read_text())
    got = {(x["task"], x["metric"], x["split"]): x for x in report["rows"]}
    assert set(got) == {(x.task, x.metric, x.split) for x in chain_report.ROWS}
    for key, row in got.items():
        if key not in (("vqa", "vqa_score", "test-dev"), ("vqa", "vqa_score", "test-std")):  # EvalAI's
            assert isinstance(row["value"], float) and 0 <= row["value"] <= 100, row
        assert row["paper"] is None  # the tiny model has no paper counterpart
    stages = {s["name"]: s for s in report["stages"]}
    assert all(s["status"] == "complete" and s["wall_hours"] > 0 for s in stages.values()), stages
    assert {n: s["job_id"] for n, s in stages.items()} == {n: i for n, i in ids.items() if n != "report"}
    assert report["pretraining"]["pairs_per_s"] > 0
    preds = json.loads((run / "eval/vqa_test-dev_predictions.json").read_text())
    assert len(preds) == json.loads((run / "eval/vqa_test-dev.json").read_text())["num_questions"] > 0
    # The fine-tunes started from the COCO-retrieval model, which started from the export.
    assert "initialised from " + str(run / "retrieval_coco") in (run / "vqa" / "train.log").read_text()
    assert "initialised from " + str(run / "export") in (run / "retrieval_coco" / "train.log").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_rerun_submits_nothing(chain):
    conf, run, cache, first = chain
    assert first.returncode == 0
    before, jobs = all_job_ids(conf), (run / "reproduce/jobs.json").read_text()
    r = reproduce(conf, run, cache, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(planned(r).values()) == {"skip"} and submitted(r) == {}
    assert all_job_ids(conf) == before and (run / "reproduce/jobs.json").read_text() == jobs


@pytest.mark.slurm
@pytest.mark.slow
def test_failed_stage_is_named_and_rerun_with_its_dependents_only(chain):
    """VQA loses its final metrics (as after a crash) and its evaluation data goes missing: the rerun
    resubmits VQA, its evaluation and the report, nothing else; --wait names the evaluation that failed.
    With the data back, the next rerun resubmits that evaluation and the report only."""
    conf, run, cache, first = chain
    assert first.returncode == 0
    (run / "vqa/final_metrics.json").unlink()
    questions = (
        Path(chain_plan.task_data_root(run / "vqa")) / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    )
    aside = questions.with_suffix(".aside")
    questions.rename(aside)
    try:
        r = reproduce(conf, run, cache, timeout=300)
    finally:
        aside.rename(questions)
    assert r.returncode == 1, r.stdout + r.stderr
    assert {n: a for n, a in planned(r).items() if a != "skip"} == {
        "vqa": "submit",
        "eval_vqa": "fresh",
        "report": "fresh",
    }
    assert list(submitted(r)) == ["vqa", "eval_vqa", "report"]
    assert re.search(
        r"stage eval_vqa failed \(job \d+, FAILED\); log: \S+/logs/eval_vqa-\d+\.out", r.stdout
    ), r.stdout
    assert "failed: eval_vqa;" in r.stdout
    assert (run / "vqa/final_metrics.json").exists()  # resumed at its last step: validated, not retrained
    assert "is already complete (step 3 of 3)" in (run / "vqa/train.log").read_text()
    report = json.loads((run / "report.json").read_text())  # the report ran anyway (afterany)
    assert {s["name"]: s["status"] for s in report["stages"]}["eval_vqa"] == "failed"

    r = reproduce(conf, run, cache, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(submitted(r)) == ["eval_vqa", "report"]
    report = json.loads((run / "report.json").read_text())
    assert {s["status"] for s in report["stages"]} == {"complete"}


@pytest.mark.slurm
@pytest.mark.slow
def test_bad_data_path_fails_at_preflight_with_nothing_submitted(cluster, tmp_path):  # noqa: F811
    before = all_job_ids(cluster)
    run = tmp_path / "run"
    r = reproduce(
        cluster,
        run,
        tmp_path / "cache",
        "vqa:task.synthetic=false",
        "vqa:task.data_root=/no/such/vqa",
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "vqa (--config vqa_tiny_synthetic): task.data_root='/no/such/vqa': no such directory" in r.stdout
    assert "nothing was submitted" in r.stdout and submitted(r) == {}
    assert all_job_ids(cluster) == before and not (run / "reproduce").exists()
