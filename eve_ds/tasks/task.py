"""What a downstream task adds to the shared trainer, and the exactly resumable loader of its examples.

A task = a reader for the dataset's official files (`*_data.py`), a metric (`*_eval.py`) and an objective
in the registry (`eve_ds/objectives/`). The trainer, engine, checkpoints and CLI are the pre-training ones:

    task = build_task(cfg.task, tokenizer, cache_dir, image_size, max_text_len)
    task.prepare()                      # rank 0 first: generate a synthetic set, read the files
    loader = task.train_loader(...)     # map-style examples in a seeded order, resumable by batch count
    metrics = task.evaluate(model, split, ...)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from eve_ds.tasks.config import TaskConfig

log = logging.getLogger(__name__)


@dataclass
class TaskContext:
    """What every task needs from the run besides its own config."""

    tokenizer: object
    cache_dir: str
    image_size: int
    max_text_len: int
    seed: int = 0
    num_workers: int = 1
    hflip: float = 0.5
    image_mean: list[float] | None = None  # data.image_mean / image_std; None = ImageNet's
    image_std: list[float] | None = None


class Task:
    """Base class: subclasses set `objectives` and `metric` and implement the methods that raise."""

    objectives: tuple[str, ...] = ()  # objective registry names, in order (their modules hold the heads)
    metric: str = ""  # the key of the main metric in `evaluate`'s result

    def __init__(self, cfg: TaskConfig, ctx: TaskContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    def prepare(self) -> None:
        """Generate what is missing (synthetic data) and read the training files."""
        raise NotImplementedError

    def objective_options(self) -> dict:
        """ObjectiveConfig fields this task's data decides (e.g. the number of answers)."""
        return {}

    def train_dataset(self) -> tuple[Dataset, Callable]:
        """(dataset whose items are dicts or None, collate(items) -> batch dict or None)."""
        raise NotImplementedError

    def evaluate(self, model, split: str, *, device: str, dtype: torch.dtype, batch_size: int) -> dict:
        return self.score(model, split, device=device, dtype=dtype, batch_size=batch_size)

    def assets(self) -> dict:
        """JSON-able data a model of this task needs at inference (saved in checkpoints and exports)."""
        return {}

    def load_assets(self, assets: dict) -> None:
        """Take back what `assets` saved (from a checkpoint's or export's config["task"])."""

    def evaluate_split(
        self, model, split: str, *, device: str, batch_size: int, predictions: str | None = None
    ) -> dict:
        """`eve-evaluate`: a whole split of the files under task.data_root, with a checkpoint's model."""
        return self.score(model, split, device=device, batch_size=batch_size, predictions=predictions)

    def score(
        self,
        model,
        split: str,
        *,
        device: str,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        predictions: str | None = None,
    ) -> dict:
        """The metrics of `split` (what `evaluate` and `evaluate_split` return unless a task overrides them);
        with `predictions`, the task's prediction file written there."""
        raise NotImplementedError

    def train_loader(self, *, batch_size: int, rank: int, world_size: int, start_batch: int) -> DataLoader:
        dataset, collate = self.train_dataset()
        sampler = EpochBatchSampler(len(dataset), batch_size, rank, world_size, self.ctx.seed, start_batch)
        return DataLoader(
            EpochItems(dataset),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.ctx.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.ctx.num_workers else None,
        )


class EpochBatchSampler(Sampler):
    """Infinite batches of (epoch, index) pairs for one rank, resumable from `start_batch`.

    Epoch e is a permutation of the dataset seeded by (seed, e); its global batch k holds the positions
    [k·B·W, (k+1)·B·W), of which rank r takes the r-th B. A batch is a pure function of (seed, rank,
    world size, batch size, its number), so a resumed run continues exactly where it stopped. Each epoch
    drops its last incomplete global batch.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int = 0):
        if n < batch_size * world_size:
            raise ValueError(
                f"{n} training examples are fewer than one global batch ({batch_size} x {world_size} ranks)"
            )
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_batch = seed, start_batch
        self.batches_per_epoch = n // (batch_size * world_size)

    def permutation(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)
        return self._perm

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start_batch
        while True:
            epoch, k = divmod(b, self.batches_per_epoch)
            start = (k * self.world_size + self.rank) * self.batch_size
            yield [(epoch, int(i)) for i in self.permutation(epoch)[start : start + self.batch_size]]
            b += 1

    def __len__(self) -> int:
        return self.batches_per_epoch


class EpochItems(Dataset):
    """`dataset[(epoch, i)]` = item i with the epoch's augmentation (datasets with `set_epoch`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[i]


TASKS: dict[str, type[Task]] = {}
TASK_MODULES = {"vqa": "vqa_task", "retrieval": "retrieval_task", "nlvr2": "nlvr2_task"}  # in eve_ds/tasks/


def register_task(name: str):
    def wrap(cls):
        TASKS[name] = cls
        return cls

    return wrap


def build_task(cfg: TaskConfig, ctx: TaskContext) -> Task | None:
    """The task of `cfg.name`; None for pre-training (msm)."""
    if cfg.name == "msm":
        return None
    importlib.import_module(f"eve_ds.tasks.{TASK_MODULES[cfg.name]}")  # registers the task
    if cfg.name not in TASKS:
        raise ValueError(f"task.name={cfg.name!r}: no such task (have {sorted(TASKS)})")
    return TASKS[cfg.name](cfg, ctx)
