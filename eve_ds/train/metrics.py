"""Rank-aware logging, JSON-lines metrics, wandb."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever `sys.stderr` is when a record is emitted, not to the stream
    it was made with: once stderr is replaced (a test's capture, a redirect), a handler left on the root
    logger by an earlier run never writes to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream assign it: always stderr
        pass


def setup_logging(rank: int, run_dir: Path | None = None) -> None:
    """INFO on rank 0 (console + RUN_DIR/train.log), warnings only on the other ranks."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = ConsoleHandler()
    console.setFormatter(fmt)
    root.addHandler(console)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def to_python(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class MetricsWriter:
    """RUN_DIR/metrics.jsonl (one object per logged step) and, when enabled, wandb. Rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg=None, config: dict | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if enabled and wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self.wandb = _init_wandb(wandb_cfg, run_dir, config)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        from eve_ds.utils.io import atomic_write_text

        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: to_python(v) for k, v in record.items()}
        line = json.dumps(record, allow_nan=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.wandb.log(flat, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg, run_dir: Path, config: dict | None):
    import wandb

    mode = cfg.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
        logger.warning("wandb.mode=online but no API key is configured: logging offline to %s", run_dir)
        mode = "offline"
    return wandb.init(
        project=cfg.project,
        name=cfg.name or run_dir.name,
        entity=cfg.entity,
        mode=mode,
        dir=str(run_dir),
        config=config,
        resume="allow",
        id=_wandb_id(run_dir),
    )


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run dir, so that a resumed run continues the same wandb run."""
    f = run_dir / "wandb_id.txt"
    if not f.exists():
        import wandb

        f.write_text(wandb.util.generate_id())
    return f.read_text().strip()


def _netrc_has_wandb() -> bool:
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, OSError, netrc.NetrcParseError):
        return False
