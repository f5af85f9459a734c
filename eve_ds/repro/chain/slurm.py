"""Submitting the chain to Slurm and following it: `sbatch` with afterok dependencies, `squeue` states, the
jobs of earlier submissions (RUN_ROOT/reproduce/jobs.json), and the wait loop of `eve-reproduce --wait`.

Training stages run their job script (slurm/launch.sh: requeue + exact resume); export, evaluation and the
report run as small jobs of `python -m eve_ds.cli.reproduce run-stage RUN_ROOT STAGE`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from eve_ds.repro.chain.plan import (
    PlanError,
    Stage,
    decide,
    has_traces,
    is_complete,
    plan,
    preflight_problems,
    set_aside,
    train_args,
    write_plan,
)
from eve_ds.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

# squeue states of a job that has not ended yet (a requeued job is PENDING again, with the same id).
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
    | {"RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
)


def sbatch_argv(
    stage: Stage, run_root: Path, deps: list[int], after: str, python: str, root: Path
) -> list[str]:
    """`sbatch ...` of one stage: its log under RUN_ROOT/logs, the dependencies (`after`: afterok, or
    afterany for the report, which also reports a chain with failed stages); training stages run their job
    script (slurm/launch.sh), the others `python -m eve_ds.cli.reproduce run-stage`."""
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name=eve-{stage.name}",
        f"--output={run_root}/logs/{stage.name}-%j.out",
        "--open-mode=append",
    ]
    if deps:
        argv += [f"--dependency={after}:" + ":".join(map(str, deps)), "--kill-on-invalid-dep=yes"]
    argv += list(stage.sbatch)
    if stage.kind == "train":
        return [*argv, str(root / stage.script), *train_args(stage, run_root)]
    cmd = (
        f"cd {shlex.quote(str(root))} && export PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}}"
        f" && exec {shlex.quote(python)} -m eve_ds.cli.reproduce run-stage {shlex.quote(str(run_root))} "
        f"{stage.name}"
    )
    return [*argv, f"--wrap={cmd}"]


def sbatch(argv: list[str], env: dict, cwd: Path) -> int:
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return int(r.stdout.strip().split(";")[0])


def job_states(job_ids: list[int]) -> dict[int, str]:
    """{job id: Slurm state} of the jobs squeue still knows (ended ones for MinJobAge, default 5 min).
    Raises RuntimeError when squeue itself fails (not when it no longer knows a job)."""
    if not job_ids:
        return {}
    argv = ["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(map(str, job_ids))]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    states = {}
    for line in r.stdout.splitlines():
        jid, _, state = line.strip().partition(" ")
        if jid.isdigit():
            states[int(jid)] = state
    return states


def read_jobs(run_root: Path) -> dict[str, dict]:
    path = run_root / "reproduce" / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record_jobs(run_root: Path, new: dict[str, dict]) -> None:
    atomic_write_json(run_root / "reproduce" / "jobs.json", {**read_jobs(run_root), **new})


def current_actions(stages: list[Stage], run_root: Path) -> tuple[dict, dict[str, str]]:
    """(jobs.json of earlier submissions, what each stage needs now: plan.decide's action)."""
    jobs = read_jobs(run_root)
    states = job_states([j["job_id"] for j in jobs.values()]) if shutil.which("squeue") else {}
    active = {n: states.get(j["job_id"]) in ACTIVE_STATES for n, j in jobs.items()}
    complete = {s.name: is_complete(s, run_root) for s in stages}
    traces = {s.name: has_traces(s, run_root) for s in stages}
    return jobs, decide(stages, complete, active, traces)


def submit(
    stages: list[Stage],
    actions: dict[str, str],
    jobs: dict,
    run_root: Path,
    root: Path,
    params: tuple[str, str, list[str]],
) -> dict[str, int]:
    """sbatch every stage to run, in order, each after the jobs of the stages it needs. `root`: the checkout
    whose slurm/ scripts run; `params`: (size, corpus, overrides), recorded in plan.json for the stage jobs.
    -> {stage: job id} of every job the chain now waits on (new and still queued ones)."""
    ids = {n: jobs[n]["job_id"] for n, a in actions.items() if a == "wait"}
    if not any(a in ("submit", "fresh") for a in actions.values()):
        return ids
    old = write_plan(run_root, *params)
    if old and old["overrides"] != list(params[2]):
        logger.info(
            f"overrides differ from the last submission ({old['overrides']}); complete stages are kept"
        )
    (run_root / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EVE_ROOT": str(root)}
    python = os.environ.get("EVE_PYTHON") or sys.executable
    for s in stages:
        if actions[s.name] not in ("submit", "fresh"):
            continue
        if actions[s.name] == "fresh":
            for moved in set_aside(s, run_root):
                logger.info(f"{s.name}: an earlier stage runs again; its old output moved to {moved}")
        deps = [ids[d] for d in s.deps if d in ids]
        after = "afterany" if s.kind == "report" else "afterok"
        ids[s.name] = sbatch(sbatch_argv(s, run_root, deps, after, python, root), env, root)
        record_jobs(run_root, {s.name: {"job_id": ids[s.name], "submitted": time.time()}})
        dep_note = f" (after {after}:{':'.join(map(str, deps))})" if deps else ""
        logger.info(f"{s.name:22s} job {ids[s.name]}{dep_note}")
    return ids


def follow(ids: dict[str, int], poll: float) -> dict[str, str]:
    """Poll squeue until every job in `ids` has ended, logging each change of state. -> {stage: its last
    state seen}."""
    last: dict[str, str] = {}
    while True:
        try:
            states = job_states(list(ids.values()))
        except RuntimeError as e:  # the controller is restarting, say: ask again
            logger.info(f"{e}; retrying")
            time.sleep(poll)
            continue
        for name, jid in ids.items():
            state = states.get(jid, "ENDED")
            if state != last.get(name):
                logger.info(f"{name:22s} job {jid} {state}")
                last[name] = state
        if not any(states.get(j) in ACTIVE_STATES for j in ids.values()):
            return last
        time.sleep(poll)


def wait(stages: list[Stage], ids: dict[str, int], run_root: Path, poll: float) -> int:
    """Wait for every job of the chain to end; 1 and the failed stages' names (with their logs) if any."""
    last = follow(ids, poll)
    failed = [s for s in stages if s.name in ids and not is_complete(s, run_root)]
    if not failed:
        logger.info(f"chain complete: {run_root / 'report.md'}")
        return 0
    for s in failed:
        jid = ids[s.name]
        state = last.get(s.name)
        reason = "CANCELLED: scancel, or a stage it needs failed" if state == "CANCELLED" else state
        log = run_root / "logs" / f"{s.name}-{jid}.out"
        logger.info(f"stage {s.name} failed (job {jid}, {reason}); log: {log}")
    logger.info(f"failed: {', '.join(s.name for s in failed)}; fix and rerun the same command to resume")
    return 1


def checkout() -> Path:
    """The checkout whose slurm/ job scripts run: EVE_ROOT (slurm/reproduce.sh sets it), else the current
    directory, as for the job scripts themselves."""
    root = Path(os.environ.get("EVE_ROOT") or ".").resolve()
    if not (root / "slurm" / "launch.sh").is_file():
        raise FileNotFoundError(
            f"EVE_ROOT={root} has no slurm/launch.sh: set EVE_ROOT to the EVE-DS checkout"
        )
    return root


def run_chain(
    params: tuple[str, str, list[str]], run_root: Path, *, until_done: bool, dry_run: bool, poll: float
) -> int:
    """Plan the chain of `params` = (size, corpus, overrides), preflight what must run, submit it and
    (`until_done`) follow it to the end. -> 0, 1 (a stage failed) or 2 (nothing or not everything submitted)."""
    try:
        stages = plan(*params)
        root = checkout()
        if not dry_run and not (shutil.which("sbatch") and shutil.which("squeue")):
            raise RuntimeError(
                "sbatch/squeue not found: run on a Slurm login node (or start slurm/local_cluster.sh)"
            )
        jobs, actions = current_actions(stages, run_root)
    except (PlanError, FileNotFoundError, RuntimeError) as e:
        logger.info(f"error: {e}; nothing was submitted")
        return 2
    for s in stages:
        logger.info(f"{s.name:22s} {actions[s.name]}")
    problems = preflight_problems(
        stages, run_root, {n for n, a in actions.items() if a in ("submit", "fresh")}
    )
    if problems:
        logger.info("preflight failed, nothing was submitted:\n  " + "\n  ".join(problems))
        return 2
    if dry_run:
        logger.info("dry run: preflight passed, nothing was submitted")
        return 0
    try:
        ids = submit(stages, actions, jobs, run_root, root, params)
    except RuntimeError as e:  # sbatch refused a job: what was submitted keeps its dependencies
        logger.info(
            f"error: {e}\nthe stages submitted before it are queued; fix it and rerun the same command"
        )
        return 2
    if not ids:
        logger.info(f"every stage is complete: {run_root / 'report.md'}")
    elif not until_done:
        logger.info(f"watch: squeue -j {','.join(map(str, ids.values()))}; rerun the same command to resume")
    else:
        return wait(stages, ids, run_root, poll)
    return 0
