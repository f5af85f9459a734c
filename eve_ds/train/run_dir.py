"""One reader of a run directory: what `Trainer` writes, for everything that reads it back.

Layout (written by the trainer)::

    RUN_DIR/config.yaml          the resolved run config: exactly what ran
    RUN_DIR/ds_config.json       the DeepSpeed config the engine was built with
    RUN_DIR/metrics.jsonl        one JSON object per logged step (training and validation records)
    RUN_DIR/final_metrics.json   written once, when the run reaches train.max_steps
    RUN_DIR/checkpoints/         DeepSpeed tags (see eve_ds/train/checkpoint.py)
    RUN_DIR/train.log            rank 0's log

A run may be read while it trains: `records` skips a last line that is still being written.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_path(self) -> Path:
        return self.path / "final_metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def is_run(self) -> bool:
        """True when the trainer has started a run here (it writes config.yaml before the first step)."""
        return self.config_path.is_file()

    def config(self) -> dict:
        """config.yaml as a dict (see `eve_ds.train.config.load_config(str(run.config_path))` for the typed
        tree)."""
        return yaml.safe_load(self.config_path.read_text()) or {}

    def records(self) -> list[dict]:
        """Every record of metrics.jsonl, oldest first; [] when there is none. A line that does not parse is
        the one being written (only the last line may be incomplete): it is left out."""
        if not self.metrics_path.exists():
            return []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise ValueError(
                        f"{self.metrics_path}: line {i + 1} is not JSON: {line[:80]!r}"
                    ) from None
        return out

    def train_records(self) -> list[dict]:
        """The training records (those with a `loss`), oldest first."""
        return [r for r in self.records() if "loss" in r]

    def windows(self) -> list[tuple[int, float]]:
        """[(steps, seconds)] of each logged window of the training loop: a record at step s with
        `samples_per_s` covers the steps since the previous such record."""
        batch = self.config()["train"]["global_batch_size"]
        out, prev = [], 0
        for rec in self.records():
            if "samples_per_s" in rec:
                steps = rec["step"] - prev
                out.append((steps, steps * batch / rec["samples_per_s"]))
                prev = rec["step"]
        return out

    def final_metrics(self) -> dict | None:
        """final_metrics.json, or None while the run has not finished."""
        return json.loads(self.final_path.read_text()) if self.final_path.exists() else None

    def is_finished(self) -> bool:
        return self.final_path.exists()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint tag directory, or None."""
        from eve_ds.train.checkpoint import latest_complete

        return latest_complete(self.checkpoints)
