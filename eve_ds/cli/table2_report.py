"""`eve-report`: the Table 2 reproduction's report, and the chain of Slurm jobs behind slurm/reproduce.sh.

eve-report RUN_ROOT                          # RUN_ROOT/report.md + report.json, from whatever has run
eve-report RUN_ROOT --vqa-test-dev 77.9      # record the EvalAI test-dev score of the predictions file
python -m eve_ds.cli.table2_report reproduce --size tiny --run-root DIR --wait [KEY=VALUE ...]
python -m eve_ds.cli.table2_report run-stage RUN_ROOT STAGE   # inside a stage's job (export, evaluate, report)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

from eve_ds.bench import table2 as t2
from eve_ds.utils.io import atomic_write_json

POLL_S = 5.0


def log(msg: str) -> None:
    print(f"reproduce: {msg}", flush=True)


# -- eve-report ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eve-report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_root", help="the --run-root of slurm/reproduce.sh (a partial chain works too)")
    p.add_argument("--size", choices=t2.SIZES, help="default: the chain's (RUN_ROOT/reproduce/plan.json)")
    p.add_argument("--corpus", choices=t2.CORPORA, default=None)
    p.add_argument("--vqa-test-dev", type=float, help="the EvalAI test-dev score (percent) to record")
    p.add_argument("--json", action="store_true", help="print report.json instead of the markdown")
    args = p.parse_args(argv)
    root = Path(args.run_root).resolve()
    if args.vqa_test_dev is not None:
        atomic_write_json(root / t2.EVALAI_FILE, {"overall": args.vqa_test_dev})
    try:
        report = t2.write_report(root, args.size, args.corpus)
    except (FileNotFoundError, t2.PlanError) as e:
        print(f"eve-report: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else t2.markdown(report))
    return 0


# -- the chain ----------------------------------------------------------------------------------------


def parse_reproduce(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="slurm/reproduce.sh",
        description="Submit the whole Table 2 chain with Slurm dependencies; rerun to resume.",
    )
    p.add_argument("--size", required=True, choices=t2.SIZES)
    p.add_argument("--corpus", default="4m", choices=t2.CORPORA)
    p.add_argument("--run-root", required=True, help="every stage's output goes under it")
    p.add_argument("--wait", action="store_true", help="block until the chain ends; exit 1 if a stage failed")
    p.add_argument("--dry-run", action="store_true", help="preflight and print the actions; submit nothing")
    p.add_argument("--poll", type=float, default=POLL_S, help="--wait: seconds between squeue calls")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[STAGE:]KEY=VALUE",
        help="config overrides: every training stage, or one (pretrain, retrieval_coco, vqa, nlvr2, "
        "retrieval_flickr; finetune: the four fine-tunes)",
    )
    return p.parse_args(argv)


def checkout() -> Path:
    """The checkout whose slurm/ job scripts run: EVE_ROOT (slurm/reproduce.sh sets it), else the current
    directory, as for the job scripts themselves."""
    root = Path(os.environ.get("EVE_ROOT") or ".").resolve()
    if not (root / "slurm" / "launch.sh").is_file():
        raise FileNotFoundError(
            f"EVE_ROOT={root} has no slurm/launch.sh: set EVE_ROOT to the EVE-DS checkout"
        )
    return root


def reproduce_main(argv: list[str] | None = None) -> int:
    args = parse_reproduce(argv)
    run_root = Path(args.run_root).resolve()
    try:
        stages = t2.plan(args.size, args.corpus, args.overrides)
        root = checkout()
    except (t2.PlanError, FileNotFoundError) as e:
        log(f"error: {e}; nothing was submitted")
        return 2
    if not args.dry_run and not (shutil.which("sbatch") and shutil.which("squeue")):
        log("error: sbatch/squeue not found: run on a Slurm login node (or start slurm/local_cluster.sh)")
        return 2
    try:
        jobs, actions = current_actions(stages, run_root)
    except RuntimeError as e:
        log(f"error: {e}; nothing was submitted")
        return 2
    to_run = {n for n, a in actions.items() if a in ("submit", "fresh")}
    for s in stages:
        log(f"{s.name:22s} {actions[s.name]}")
    problems = t2.preflight_problems(stages, run_root, to_run)
    if problems:
        log("preflight failed, nothing was submitted:\n  " + "\n  ".join(problems))
        return 2
    if args.dry_run:
        log("dry run: preflight passed, nothing was submitted")
        return 0
    try:
        ids = submit(stages, actions, jobs, run_root, root, args)
    except RuntimeError as e:  # sbatch refused a job: what was submitted keeps its dependencies
        log(f"error: {e}\nthe stages submitted before it are queued; fix it and rerun the same command")
        return 2
    if not ids:
        log(f"every stage is complete: {run_root / 'report.md'}")
        return 0
    if not args.wait:
        log(f"watch: squeue -j {','.join(map(str, ids.values()))}; rerun the same command to resume")
        return 0
    return wait(stages, ids, run_root, args.poll)


def current_actions(stages: list[t2.Stage], run_root: Path) -> tuple[dict, dict[str, str]]:
    """(jobs.json of earlier submissions, what each stage needs now: t2.decide's action)."""
    jobs = t2.read_jobs(run_root)
    states = t2.job_states([j["job_id"] for j in jobs.values()]) if shutil.which("squeue") else {}
    active = {n: states.get(j["job_id"]) in t2.ACTIVE_STATES for n, j in jobs.items()}
    complete = {s.name: t2.is_complete(s, run_root) for s in stages}
    traces = {s.name: t2.has_traces(s, run_root) for s in stages}
    return jobs, t2.decide(stages, complete, active, traces)


def submit(
    stages: list[t2.Stage], actions: dict, jobs: dict, run_root: Path, root: Path, args
) -> dict[str, int]:
    """sbatch every stage to run, in order, each after the jobs of the stages it needs. -> {stage: job id}
    of every job the chain now waits on (new and still queued ones)."""
    ids = {n: jobs[n]["job_id"] for n, a in actions.items() if a == "wait"}
    if not any(a in ("submit", "fresh") for a in actions.values()):
        return ids
    old = t2.write_plan(run_root, args.size, args.corpus, args.overrides)
    if old and old["overrides"] != list(args.overrides):
        log(f"overrides differ from the last submission ({old['overrides']}); complete stages are kept")
    (run_root / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EVE_ROOT": str(root)}
    python = os.environ.get("EVE_PYTHON") or sys.executable
    for s in stages:
        if actions[s.name] not in ("submit", "fresh"):
            continue
        if actions[s.name] == "fresh":
            for moved in t2.set_aside(s, run_root):
                log(f"{s.name}: an earlier stage runs again; its old output moved to {moved}")
        deps = [ids[d] for d in s.deps if d in ids]
        after = "afterany" if s.kind == "report" else "afterok"
        argv = t2.sbatch_argv(s, run_root, deps, after, python, root)
        ids[s.name] = t2.sbatch(argv, env, root)
        t2.record_jobs(run_root, {s.name: {"job_id": ids[s.name], "submitted": time.time()}})
        log(
            f"{s.name:22s} job {ids[s.name]}"
            + (f" (after {after}:{':'.join(map(str, deps))})" if deps else "")
        )
    return ids


def wait(stages: list[t2.Stage], ids: dict[str, int], run_root: Path, poll: float) -> int:
    """Poll squeue until every job of the chain has ended; 1 and the failed stages' names if any."""
    last: dict[str, str] = {}
    while True:
        try:
            states = t2.job_states(list(ids.values()))
        except RuntimeError as e:  # the controller is restarting, say: ask again
            log(f"{e}; retrying")
            time.sleep(poll)
            continue
        for name, jid in ids.items():
            state = states.get(jid, "ENDED")
            if state != last.get(name):
                log(f"{name:22s} job {jid} {state}")
                last[name] = state
        if not any(states.get(j) in t2.ACTIVE_STATES for j in ids.values()):
            break
        time.sleep(poll)
    failed = [s for s in stages if s.name in ids and not t2.is_complete(s, run_root)]
    if not failed:
        log(f"chain complete: {run_root / 'report.md'}")
        return 0
    for s in failed:
        jid = ids[s.name]
        state = last.get(s.name)
        reason = "CANCELLED: scancel, or a stage it needs failed" if state == "CANCELLED" else state
        log(f"stage {s.name} failed (job {jid}, {reason}); log: {run_root / 'logs' / f'{s.name}-{jid}.out'}")
    log(f"failed: {', '.join(s.name for s in failed)}; fix and rerun the same command to resume")
    return 1


# -- inside a stage's job -----------------------------------------------------------------------------


def run_stage_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="table2_report run-stage")
    p.add_argument("run_root")
    p.add_argument("stage")
    args = p.parse_args(argv)
    run_root = Path(args.run_root).resolve()
    params = t2.read_plan(run_root)
    stage = t2.by_name(t2.plan(params["size"], params["corpus"], params["overrides"]))[args.stage]
    start, rc = time.time(), 1
    try:
        rc = run_stage(stage, run_root)
    finally:
        t2.record_stage_run(run_root, stage.name, start, rc)
    return rc


def run_stage(stage: t2.Stage, run_root: Path) -> int:
    """Export, evaluation or report, through the project's own commands."""
    if stage.kind == "export":
        from eve_ds.cli.convert_ckpt import main as convert

        return convert(["export", str(run_root / stage.source), str(run_root / stage.name)])
    if stage.kind == "report":
        print(t2.markdown(t2.write_report(run_root)))
        return 0
    if stage.kind != "evaluate":
        raise ValueError(f"stage {stage.name} ({stage.kind}) runs through its job script, not run-stage")
    run_dir = run_root / stage.source
    data_root = t2.task_data_root(run_dir)
    for e in stage.evaluations:
        rc = evaluate(e, run_dir, data_root, run_root)
        if rc:
            return rc
    return 0


def evaluate(e: t2.Evaluation, run_dir: Path, data_root: str, run_root: Path) -> int:
    """`eve-evaluate ... --json` -> its JSON in `e.output` (written atomically: its existence = done)."""
    from eve_ds.cli.evaluate import main as eve_evaluate

    argv = [
        "--checkpoint",
        str(run_dir),
        "--task",
        e.task,
        "--data-root",
        data_root,
        "--split",
        e.split,
        "--json",
    ]
    if e.dataset:
        argv += ["--dataset", e.dataset]
    if e.predictions:
        argv += ["--predictions", str(run_root / e.predictions)]
    print(f"eve-evaluate {' '.join(argv)}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = eve_evaluate(argv)
    text = out.getvalue().strip()
    print(text, flush=True)
    if rc == 0:
        atomic_write_json(run_root / e.output, json.loads(text.splitlines()[-1]))
    return rc


COMMANDS = {"reproduce": reproduce_main, "run-stage": run_stage_main}

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = COMMANDS.get(argv[0]) if argv else None
    sys.exit(command(argv[1:]) if command else main(argv))
