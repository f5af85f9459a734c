"""What a downstream task adds to the shared trainer, and what the tasks share: the base class, the exactly
resumable loader of a task's examples, how their images are read and augmented (seeded per item and epoch)
and its JSON reader.

A task = a subpackage `eve_ds/tasks/<name>/` with a reader for the dataset's official files (`data`), a
metric (`eval`), a synthetic set in the official layout (`synthetic`) and the `Task` subclass (`task`), plus
its objectives in the registry (`eve_ds/objectives/`). Pre-training is the task `msm`
(`tasks/pretraining.py`). The trainer, engine, checkpoints and CLI are one for all of them:

    task = build_task(cfg.task, ctx)    # ctx: TaskContext (tokenizer, cache dir, image size, ...)
    task.prepare()                      # rank 0 first: generate a synthetic set, read the files
    loader = task.train_loader(...)     # map-style examples in a seeded order, resumable by batch count
    metrics = task.evaluate(model, split, ...)
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from eve_ds.data.augment import official_rand_augment
from eve_ds.data.config import DataConfig
from eve_ds.data.text import TextRule, with_rule
from eve_ds.data.transforms import _LEFT_RIGHT, crop_params, crop_resize
from eve_ds.tasks.config import BENCHMARK_TASKS, TaskConfig
from eve_ds.utils.errors import UserError

log = logging.getLogger(__name__)

# Where a task's files are named in a config and on the command line, for the hints of its data errors.
DATA_ROOT_HINT = "task.data_root, eve-evaluate --data-root"
SKIP_BAD_HINT = "task.skip_bad_eval_images=true, eve-evaluate --skip-bad-images"


class TaskDataError(UserError, ValueError):
    """A task's data that cannot be used as it is; the message names the file, key or value."""


class MissingDataFile(UserError, FileNotFoundError):
    """A file or folder of a task's dataset that is not there; the message names it."""


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
    data: DataConfig | None = None  # the image-text corpora (pre-training)
    global_batch_size: int = 1  # for the corpus mixture's steps per epoch (pre-training)
    eval_batches: int = 0  # per rank and validation; 0 = all (pre-training)
    image_mean: list[float] | None = None  # data.image_mean / image_std; None = ImageNet's
    image_std: list[float] | None = None
    model: object | None = None  # the run's model config (a task that lays rows out for its media tokens)


class Task:
    """Base class: subclasses set `objectives` and `metric` and implement the methods that raise."""

    objectives: tuple[str, ...] = ()  # objective registry names, in order (their modules hold the heads)
    metric: str = ""  # the key of the main metric in `evaluate`'s result

    def __init__(self, cfg: TaskConfig, ctx: TaskContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    def root(self) -> str:
        """The dataset's directory: task.data_root, or with task.synthetic the task's synthetic set in the
        cache dir (generated when missing, `make_synthetic`)."""
        c = self.cfg
        if not c.synthetic:
            return c.data_root
        return self.make_synthetic(
            self.ctx.cache_dir,
            seed=c.synthetic_seed,
            counts=(c.synthetic_num_train, c.synthetic_num_val, c.synthetic_num_test),
            image_size=self.ctx.image_size,
        )

    def make_synthetic(
        self, cache_dir: str, *, seed: int, counts: tuple[int, int, int], image_size: int
    ) -> str:
        """Ensure the synthetic set of (train, val, test) sizes `counts` under `cache_dir`; its root."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Generate what is missing (synthetic data) and read the training files."""
        raise NotImplementedError

    def objective_options(self) -> dict[str, dict]:
        """Constructor options of objective heads that this task's data decides, by objective name
        (e.g. {"vqa": {"num_answers": 3129}}); `train.config.resolve` records them as objective.heads."""
        return {}

    def num_examples(self) -> int | None:
        """Training examples per epoch (derives train.max_steps from task.epochs); None when unknown
        before the loader exists."""
        return len(self.train_dataset()[0])

    def data_layout(self, loader) -> dict:
        """What the checkpoint records of the data order, to tell on resume whether it can be continued."""
        return {"task": self.cfg.name, "examples": len(loader.dataset)}

    def epoch_samples(self, loader) -> int:
        return len(loader.dataset)

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

    takes_init_assets = False  # whether take_init_assets needs the initial weights' config

    def take_init_assets(self, saved: dict, source: str) -> None:
        """`train.init_from`: adopt what the initial weights' config (`saved`, its whole config dict)
        fixes for this task, e.g. the answer order its VQA head was trained with. Default: nothing."""

    # task.text_preprocess=official: (TextRule kind, word limit in training, in evaluation) [official code]
    official_text: tuple[str, int, int] | None = None

    def text_rule(self, train: bool) -> TextRule:
        """How this task's texts are cleaned before tokenisation (task.text_preprocess, text_max_words)."""
        return task_text_rule(self.cfg, train)

    def tokenizer(self, train: bool):
        """The run's tokenizer with this task's text rule in front (`eve_ds.data.text`)."""
        return with_rule(self.ctx.tokenizer, self.text_rule(train))

    def eval_context(self) -> TaskContext:
        """The context the evaluation code reads: the run's, its tokenizer with the evaluation text rule."""
        return replace(self.ctx, tokenizer=self.tokenizer(train=False))

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

    def train_image_options(self) -> dict:
        """How a task's training set reads its images: flips, seed, geometry, augmentation."""
        return {
            "train": True,
            "hflip": self.ctx.hflip,
            "seed": self.ctx.seed,
            "geometry": self.cfg.image_geometry,
            "augment": self.cfg.image_augment,
        }

    def train_loader(
        self,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        start_batch: int,
        saved_layout: dict | None = None,
    ) -> DataLoader:
        """Resumable by batch count alone: the sampler is a pure function of its arguments."""
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
            raise TaskDataError(
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


class EpochFlipDataset(Dataset):
    """A training set whose images are flipped horizontally with probability `hflip`, never when one of
    the item's texts (`flip_texts`) says "left" or "right" (a flip would make it false), and read with the
    task's `geometry` and `augment` (`load_image`).

    The flip and the augmentation of item i in epoch e are drawn from RNGs seeded by (seed, e, i), so an
    item looks the same whichever worker loads it, a resumed run sees the images an uninterrupted one
    would, and each epoch has its own draws (`set_epoch`). Subclasses pass their items (one per index),
    set `image_size` and say which texts an item has.
    """

    def __init__(
        self,
        items: list,
        *,
        train: bool,
        hflip: float = 0.0,
        seed: int = 0,
        geometry: str = "square_crop",
        augment: str = "none",
    ) -> None:
        self.items, self.train, self.hflip, self.seed, self.epoch = items, train, hflip, seed, 0
        self.geometry, self.augment = geometry, augment

    def set_epoch(self, epoch: int) -> None:
        """Give each epoch its own flips and augmentations."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def flip_texts(self, i: int) -> Iterable[str]:
        """The texts of item i that a flip must not contradict."""
        raise NotImplementedError

    def flips(self, i: int) -> bool:
        if not self.train or self.hflip <= 0 or any(_LEFT_RIGHT.search(t) for t in self.flip_texts(i)):
            return False
        return random.Random(self.seed * 1_000_003 + self.epoch * len(self) + i).random() < self.hflip

    def image_seed(self, i: int, k: int = 0) -> int | None:
        """The seed of image k of item i's random crop and augmentation this epoch; None when evaluating.
        A stream apart from the flips' (SeedSequence of (seed, epoch, i, k))."""
        if not self.train:
            return None
        return int(np.random.SeedSequence((self.seed, self.epoch, i, k)).generate_state(1)[0])

    def load(self, path: str, i: int, k: int = 0) -> np.ndarray:
        """Image k of item i as `decode_image` reads it for this dataset (raises when unreadable)."""
        return decode_image(
            path, self.image_size, self.geometry, augment=self.augment, seed=self.image_seed(i, k)
        )


def read_json_file(path: str, key: str, error_cls: type[Exception]) -> list:
    """The list under `key` of the JSON object in `path`. A missing file raises MissingDataFile (a FileNotFoundError), any
    other reason the file cannot be used `error_cls`; both messages name the file."""
    if not os.path.isfile(path):
        raise MissingDataFile(f"{path} does not exist (check {DATA_ROOT_HINT})")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error_cls(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or key not in obj:
        has = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise error_cls(f'{path}: expected a JSON object with the field "{key}" (has {has})')
    if not isinstance(obj[key], list):
        raise error_cls(f'{path}: field "{key}" must be a list, got {obj[key]!r:.80}')
    return obj[key]


# How a downstream image becomes (S, S) (task.image_geometry): `square_crop` [ours] the shorter side resized to S and the centre
# square kept, in training and evaluation (bilinear); `official` [official code] the whole image, resized
# to S x S for evaluation and RandomResizedCrop(S, scale (0.5, 1), bicubic) of it for training.
TRAIN_CROP_SCALE = (0.5, 1.0)  # [official code]
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default, which the official code keeps


@cache
def _color_jitter():
    import torchvision.transforms as T  # only runs that augment pay for the import

    return T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)


def augment_image(img: Image.Image, name: str, seed: int) -> Image.Image:
    """task.image_augment drawn from `seed`: `randaugment` [official code, VQA and NLVR2] the release's
    RandomAugment(2, 7) (data/augment.py: geometric and tone operations only, no colour change),
    `color_jitter` [official code, retrieval] torchvision's ColorJitter(0.4, 0.4, 0.4)."""
    if name == "randaugment":
        return official_rand_augment(img, random.Random(seed))
    # torchvision draws from torch's global RNG: seed it per image, and leave the caller's untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _color_jitter()(img)


def decode_image(
    path: str,
    image_size: int,
    geometry: str = "square_crop",
    *,
    augment: str = "none",
    seed: int | None = None,
) -> np.ndarray:
    """(S, S, 3) uint8 of the image at `path` with `geometry` (IMAGE_GEOMETRIES); `seed` None = evaluation
    (nothing random), else training: the random crop (`official`) and `augment` drawn from it. Raises
    PIL's errors when the file cannot be read or decoded."""
    with Image.open(path) as img:
        w, h = img.size
        if geometry == "square_crop":
            side = min(w, h)
            out = crop_resize(img, ((w - side) // 2, (h - side) // 2, side, side), image_size)
        elif seed is None:
            out = img.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        else:
            left, top, cw, ch = crop_params(w, h, TRAIN_CROP_SCALE, TRAIN_CROP_RATIO, random.Random(seed))
            box = (left, top, left + cw, top + ch)
            out = img.convert("RGB").resize((image_size, image_size), Image.BICUBIC, box=box)
    if seed is not None and augment != "none":
        out = augment_image(out, augment, seed)
    return np.asarray(out)


def load_image(path: str, image_size: int, geometry: str = "square_crop", **kw) -> np.ndarray | None:
    """`decode_image`, or None if the file cannot be decoded."""
    try:
        return decode_image(path, image_size, geometry, **kw)
    except Exception:  # missing, truncated, not an image, decompression bomb: all mean "unusable"
        return None


TASKS: dict[str, type[Task]] = {}
# The module that registers each task, under eve_ds/tasks/ (a task subpackage's `task` module).
TASK_MODULES = {
    "msm": "pretraining",
    "vqa": "vqa.task",
    "retrieval": "retrieval.task",
    "nlvr2": "nlvr2.task",
    "evlm_synthetic": "evlm_synthetic.task",
    "evlm_packed": "evlm_packed.task",
    **{name: "evlm_bench.task" for name in BENCHMARK_TASKS},
}


def register_task(name: str):
    def wrap(cls):
        TASKS[name] = cls
        return cls

    return wrap


def task_class(name: str) -> type[Task]:
    """The Task subclass registered as `name` (`msm` = pre-training)."""
    importlib.import_module(f"eve_ds.tasks.{TASK_MODULES[name]}")  # registers the task
    if name not in TASKS:
        raise ValueError(f"task.name={name!r}: no such task (have {sorted(TASKS)})")
    return TASKS[name]


def task_text_rule(cfg: TaskConfig, train: bool) -> TextRule:
    """The text rule of task `cfg.name` under cfg.text_preprocess / text_max_words, in training or evaluation."""
    official = task_class(cfg.name).official_text
    if cfg.text_preprocess == "none" or official is None:
        return TextRule()
    kind, train_words, eval_words = official
    return TextRule(kind, cfg.text_max_words or (train_words if train else eval_words))


def build_task(cfg: TaskConfig, ctx: TaskContext) -> Task:
    """The task of `cfg.name` (`msm` = pre-training)."""
    return task_class(cfg.name)(cfg, ctx)
