"""Run one training (pre-training or fine-tuning config) as a fresh process of the project's trainer, or in
this process: the one launcher of the tools that run many trainings (ablations, fine-tuning gain)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path


def run_training(
    config: str,
    run_dir: str | Path,
    overrides: list[str],
    *,
    in_process: bool = False,
    threads: int | None = None,
    log: str | Path | None = None,
    module: str = "eve_ds.cli.pretrain",
) -> None:
    """`eve-pretrain --config CONFIG --run-dir RUN_DIR OVERRIDES...` (fine-tuning configs included).

    A fresh process by default, with its output in `log` (default: RUN_DIR.log next to the run) and
    OMP_NUM_THREADS=`threads` when given; `in_process`: the Trainer in this process (no interpreter
    start-up; the trainer installs signal handlers, so only from the main thread). `module`: another entry
    point that takes eve-pretrain's arguments (a research variant of the trainer). Raises RuntimeError
    when the training fails, with the log's tail."""
    run_dir = Path(run_dir)
    if in_process:
        from eve_ds.train.config import load_config
        from eve_ds.train.trainer import Trainer

        rc = Trainer(load_config(config, overrides), run_dir).train()
        if rc != 0:
            raise RuntimeError(f"training {config} in {run_dir} ({overrides}) exited with {rc}")
        return
    cmd = [sys.executable, "-m", module, "--config", config, "--run-dir", str(run_dir)]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(log) if log else run_dir.parent / f"{run_dir.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log_path, "w") as out:
        proc = subprocess.run([*cmd, *overrides], stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join([*cmd, *overrides])} failed ({proc.returncode}):\n{tail}")
