"""Checkpoints: DeepSpeed's `save_checkpoint` plus the trainer state, made crash-safe.

Layout::

    RUN_DIR/checkpoints/step_00001000/   DeepSpeed files (model states, ZeRO shards, one file per expert)
                                         eve_config.json, trainer_state.json, rng_state_rank{r}.pt
                                         eve_complete.json   <- written last, atomically
    RUN_DIR/checkpoints/latest           tag of the newest complete checkpoint (atomic rename)

A tag directory without ``eve_complete.json`` (a crash or a kill during the save) is never resumed from:
`latest_complete` scans for the newest complete tag rather than trusting any pointer.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from eve_ds.train.distributed import barrier
from eve_ds.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

COMPLETE = "eve_complete.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(root: Path) -> list[Path]:
    """Complete checkpoint tag directories, oldest first."""
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda p: p.name)


def latest_complete(path: Path) -> Path | None:
    """Newest complete tag dir under a run dir, a checkpoints dir, or `path` itself if it is a tag dir."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    for root in (path / "checkpoints", path):
        tags = complete_tags(root)
        if tags:
            return tags[-1]
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, root: Path, rank: int, keep_last: int) -> None:
        self.root, self.rank, self.keep_last = Path(root), rank, keep_last

    def save(
        self, engine, step: int, trainer_state: dict, eve_config: dict, save_kwargs: dict | None = None
    ) -> Path:
        """Collective: every rank calls it. Returns the tag directory. `save_kwargs`: extra arguments of
        `engine.save_checkpoint` (the model family's)."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # an incomplete leftover of an earlier attempt at this step
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False, **(save_kwargs or {}))
        torch.save(rng_state(), tag_dir / f".rng_state_rank{self.rank}.pt.tmp")
        (tag_dir / f".rng_state_rank{self.rank}.pt.tmp").replace(tag_dir / f"rng_state_rank{self.rank}.pt")
        if self.rank == 0:
            atomic_write_json(tag_dir / "eve_config.json", eve_config)
            atomic_write_json(tag_dir / "trainer_state.json", trainer_state)
        barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if self.rank == 0:
            atomic_write_json(tag_dir / COMPLETE, {"step": step})
            atomic_write_text(self.root / "latest", tag)
            self._prune()
        barrier()
        logger.info("saved checkpoint %s", tag_dir)
        return tag_dir

    def _prune(self) -> None:
        tags = complete_tags(self.root)
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        newest = tags[-1].name if tags else ""
        # Incomplete tag dirs older than the newest complete one are debris of interrupted saves.
        for p in self.root.iterdir():
            if p.is_dir() and TAG_RE.match(p.name) and not (p / COMPLETE).exists() and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)

    def load_rng(self, tag_dir: Path) -> bool:
        f = tag_dir / f"rng_state_rank{self.rank}.pt"
        if not f.is_file():
            logger.warning("%s missing: RNG streams start fresh (resume is not bitwise exact)", f)
            return False
        set_rng_state(torch.load(f, weights_only=False))
        return True


MODULE_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's file of the (non-expert) module weights


def module_file_keys(tag: Path) -> set[str]:
    """The tensor names of a checkpoint's module file, read memory-mapped (no weight is copied)."""
    state = torch.load(tag / MODULE_FILE, map_location="cpu", weights_only=False, mmap=True)
    return set(state["module"])


def missing_trainable_problem(module: torch.nn.Module, tag: Path) -> str | None:
    """Why `tag` cannot resume `module` when its module file leaves out frozen weights (`exclude_frozen_
    parameters`): the keys it lacks must be frozen ones (the model already holds those) or experts (in
    DeepSpeed's expert files); a trainable one would silently keep its fresh value. None when it fits."""
    from deepspeed.moe.utils import is_moe_param

    saved = module_file_keys(tag)
    elsewhere = {n for n, p in module.named_parameters() if not p.requires_grad or is_moe_param(p)}
    own = module.state_dict()
    missing = [k for k in own if k not in saved and k not in elsewhere]
    unexpected = sorted(saved - set(own))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return (
            f"{tag / MODULE_FILE} lacks the trainable tensor {missing[0]!r}{more}: not a checkpoint of "
            "this run (or of a run that froze it)"
        )
    if unexpected:
        return (
            f"{tag / MODULE_FILE} holds {unexpected[0]!r}, which the model does not have: not a checkpoint "
            "of this run"
        )
    return None
