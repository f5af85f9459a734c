"""Pre-training as a task (`msm`): the image-text corpora (`data:` section) in, the pre-training objectives
(`objective.objectives`) trained, their metrics on held-out shards out.

    task = build_task(TaskConfig(name="msm"), TaskContext(..., data=cfg.data))
    task.prepare()                                  # rank 0 first: generate the synthetic corpus if asked
    loader = task.train_loader(batch_size=..., rank=..., world_size=..., start_batch=..., saved_layout=...)
    metrics = task.evaluate(model, "val", device=..., dtype=..., batch_size=...)

Validation masks come from a generator seeded per batch, so every call (and every checkpoint) sees the
same masks. On the synthetic corpus it adds the attribute-word probe (`data/synthetic_probe.py`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from tqdm import tqdm

from eve_ds.data import build_train_loader, build_val_loader, ensure_synthetic_corpus, resolve_val_spec
from eve_ds.data.pipeline import mixture
from eve_ds.data.synthetic_probe import COUNTER_PREFIX, AttributeProbe, synthetic_probe
from eve_ds.data.transforms import batch_to_device
from eve_ds.tasks.base import Task, register_task
from eve_ds.utils.ranks import rank_and_world

log = logging.getLogger(__name__)


@register_task("msm")
class PretrainTask(Task):
    objectives = ()  # any pre-training set: objective.objectives decides
    metric = "loss"

    @property
    def data(self):
        return self.ctx.data

    def prepare(self) -> None:
        """Generate the synthetic corpus when asked for and missing (rank 0, before the others read it)."""
        d = self.data
        if d.synthetic:
            ensure_synthetic_corpus(
                d.cache_dir, d.synthetic_num_train, d.synthetic_num_val, d.synthetic_seed, self.ctx.image_size
            )

    def num_examples(self) -> None:
        return None  # the corpora are sized when the loader opens their manifests; max_steps is required

    def train_loader(
        self,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        start_batch: int,
        saved_layout: dict | None = None,
    ):
        loader = build_train_loader(
            self.data,
            image_size=self.ctx.image_size,
            max_text_len=self.ctx.max_text_len,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.ctx.seed,
            start_batch=start_batch,
            tokenizer=self.ctx.tokenizer,
            saved_layout=saved_layout,
        )
        self._log_mixture(loader.dataset.corpora)
        return loader

    def data_layout(self, loader) -> dict:
        return loader.layout

    def epoch_samples(self, loader) -> int:
        return loader.num_samples

    def _log_mixture(self, corpora) -> None:
        rows, steps = mixture(corpora, self.ctx.global_batch_size)
        for r in rows:
            log.info(
                "corpus %s: %d pairs in %d shards, weight %g -> %.1f%% of samples",
                r["name"],
                r["pairs"],
                r["shards"],
                r["weight"],
                100 * r["fraction"],
            )
        log.info("one epoch of the corpus union = %d steps", steps)

    def evaluate(self, model, split: str, *, device: str, dtype: torch.dtype, batch_size: int) -> dict:
        """The run's validation shards (data.val, or the synthetic corpus's val split); {} without any."""
        spec = resolve_val_spec(self.data, self.ctx.image_size)
        if spec is None:
            return {}
        return self.score(model, spec, device=device, dtype=dtype, batch_size=batch_size)

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
        """Mean metrics of the objectives over the shards `split` (a shard directory or brace spec)."""
        rank, world = rank_and_world()
        loader = build_val_loader(
            split,
            image_size=self.ctx.image_size,
            max_text_len=self.ctx.max_text_len,
            batch_size=batch_size,
            rank=rank,
            world_size=world,
            tokenizer=self.ctx.tokenizer,
        )
        probe = synthetic_probe(self.data, self.ctx.tokenizer, device)
        return evaluate(
            model,
            loader,
            device=device,
            dtype=dtype,
            seed=self.ctx.seed,
            max_batches=self.ctx.eval_batches,
            probe=probe,
            image_norm=(self.ctx.image_mean, self.ctx.image_std),
        )


@torch.no_grad()
def evaluate(
    model,
    loader: Iterable[dict],
    *,
    device: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 1234,
    max_batches: int = 0,
    probe: AttributeProbe | None = None,
    image_norm: tuple[list[float] | None, list[float] | None] = (None, None),
) -> dict[str, float]:
    """Mean of every scalar the objectives report over `loader` (all ranks together when distributed),
    `num_samples`, and the probe's metrics with `probe`."""
    was_training = model.training
    model.eval()
    sums = _sum_batches(
        model,
        loader,
        device=device,
        dtype=dtype,
        seed=seed,
        max_batches=max_batches,
        probe=probe,
        image_norm=image_norm,
    )
    model.train(was_training)
    totals = _all_reduce_sums(sums, device)
    n = max(totals.get("n", 0.0), 1.0)
    counters = {"n"} | {k for k in totals if k.startswith(COUNTER_PREFIX)}
    metrics = {k: v / n for k, v in totals.items() if k not in counters}
    metrics["num_samples"] = int(totals.get("n", 0))
    if probe is not None:
        metrics.update(probe.metrics(totals))
    return metrics


def _sum_batches(model, loader, *, device, dtype, seed, max_batches, probe, image_norm) -> dict[str, float]:
    """Per-key sums over the batches of this rank: sample counts, scalars x batch size, probe counters."""
    rank, _ = rank_and_world()
    sums: dict[str, float] = defaultdict(float, {"n": 0.0, **(probe.zero() if probe else {})})
    # fork_rng: evaluation must not move the training RNG streams (exact resume).
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        bar = tqdm(total=max_batches or None, desc="validate", leave=False, disable=rank != 0)
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            bar.update(1)
            batch = batch_to_device(batch, device, dtype, *image_norm)  # image_norm: (mean, std)
            b = batch["image"].shape[0]

            def run(x: dict, i: int = i) -> dict:  # a fresh generator: the same masks on every call
                return model(
                    x, generator=torch.Generator(device=device).manual_seed(seed + 100_003 * rank + i)
                )

            out = run(batch)
            sums["n"] += b
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:  # every scalar the objectives report
                    sums[k] += float(v) * b
            if probe is not None:
                probe.update(sums, batch, out, run)
        bar.close()
    return sums


def _all_reduce_sums(sums: dict[str, float], device: str) -> dict[str, float]:
    """Sums over every rank. A rank without batches has fewer keys: the union of keys is agreed first."""
    keys = sorted(sums)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)
        keys = sorted(set().union(*every))
    totals = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist()))
