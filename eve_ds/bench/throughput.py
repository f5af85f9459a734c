"""Pre-training throughput per task set, reproducing the shape of the paper's Table 1.

For every task set: the largest micro-batch that fits on one device (CUDA: grow-then-bisect with
out-of-memory recovery; CPU: a fixed batch), the median training-step time at that batch through the real
DeepSpeed engine (warm-up excluded), pairs/s, hours per epoch for a corpus on N GPUs (linear scaling
assumed), the ratio to MSM (= MLM + MIM-pixel, EVE's objective), FLOPs per pair and MFU.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eve_ds.data.transforms import batch_to_device
from eve_ds.models.config import EVEConfig, get_config
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.flops import TextShape, flops_per_pair
from eve_ds.objectives.mim_token import token_mim_mask
from eve_ds.train.mfu import peak_tflops
from eve_ds.utils.config import apply_override

logger = logging.getLogger(__name__)

MSM = ("mlm", "mim_pixel")
# The paper's Table 1 rows (eve_ds/repro/paper.py: TABLE1) and MLM alone.
DEFAULT_TASK_SETS: list[list[str]] = [
    ["mlm", "mim_pixel"],
    ["mlm", "mim_token"],
    ["mlm", "itc", "mim_pixel"],
    ["mlm", "itc", "itm"],
    ["mlm", "itc", "itm", "mim_pixel"],
    ["mlm"],
]
# task set -> a paper row to print next to ours (e.g. repro.paper.table1_row), or None
PaperRows = Callable[[list[str]], dict | None]


@dataclass
class BenchConfig:
    model: str = "eve_tiny"
    device: str = "cpu"
    task_sets: list[list[str]] = field(default_factory=lambda: [list(t) for t in DEFAULT_TASK_SETS])
    batch_size: int | None = None  # fixed micro-batch; None: search on CUDA, CPU_DEFAULT_BATCH on CPU
    max_batch_limit: int = 2048  # upper end of the search
    batch_granularity: int = 4  # the search stops when the bracket is this narrow
    zero_stage: int = 2
    ds_config: str | None = None  # ds_configs/ name; None: zero2_bf16 on CUDA, zero2_cpu on CPU
    data: str = "memory"  # memory: pre-built batches on the device | pipeline: eve_ds.data loader
    text_len: int = 32  # real tokens per synthetic caption ([CLS] ... [SEP]), padded to max_text_len
    num_batches: int = 4  # distinct pre-built batches cycled through (memory mode)
    warmup_steps: int = 3
    windows: int = 5
    steps_per_window: int = 5
    corpus_size: int = 10_000_000
    num_gpus: int = 8
    peak_tflops: float | None = None  # None: from the device name (null on CPU)
    seed: int = 0
    model_overrides: list[str] = field(default_factory=list)  # "key=value" on the flavor's EVEConfig
    zero_grad_norm: str = "deepspeed"  # train.zero_grad_norm of the engine: deepspeed | foreach
    compile: str = "off"  # train.compile of the engine: off | blocks
    compile_backend: str = "inductor"  # train.compile_backend: inductor | aot_eager
    compile_mode: str = "default"  # train.compile_mode: default | reduce-overhead (CUDA graphs) | ...

    CPU_DEFAULT_BATCH = 8

    def model_config(self) -> EVEConfig:
        """The flavor's config with `model_overrides` applied."""
        raw = get_config(self.model).to_dict()
        for item in self.model_overrides:
            apply_override(raw, item)
        return EVEConfig.from_dict(raw)

    def ds_config_name(self) -> str:
        return self.ds_config or ("zero2_bf16" if self.device == "cuda" else "zero2_cpu")


@dataclass
class RowResult:
    task_set: list[str]
    max_micro_batch: int
    batch_source: str  # "search" (largest that fits) | "fixed" (--batch-size or the CPU default)
    step_time_s: float
    window_step_times_s: list[float]
    pairs_per_s: float
    hours_per_epoch: float
    gflops_per_pair: float
    achieved_tflops: float
    mfu: float | None
    peak_memory_gib: float | None
    losses: dict[str, float]
    ratio_to_msm: float | None = None
    batch_ratio_to_msm: float | None = None
    paper: dict | None = None


# -- batches ---------------------------------------------------------------------------------------------


def synthetic_batch(cfg: EVEConfig, batch: int, text_len: int, gen: torch.Generator) -> dict[str, Tensor]:
    """Random normalised images and captions of `text_len` real tokens ([CLS] w ... w [SEP]) padded to
    `max_text_len` (the padding keeps the attention mask a real pipeline would have)."""
    L = cfg.max_text_len
    if not 3 <= text_len <= L:
        raise ValueError(f"text_len={text_len} must be in [3, max_text_len={L}]")
    image = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=gen)
    ids = torch.randint(1000, cfg.vocab_size, (batch, L), generator=gen)
    ids[:, 0], ids[:, text_len - 1] = 101, 102  # [CLS], [SEP]
    mask = torch.zeros(batch, L, dtype=torch.long)
    mask[:, :text_len] = 1
    ids = ids.masked_fill(mask == 0, cfg.pad_token_id)
    return {"image": image, "text_ids": ids, "text_mask": mask}


def memory_batches(
    cfg: EVEConfig,
    obj: ObjectiveConfig,
    batch: int,
    bc: BenchConfig,
    dtype: torch.dtype,
    num_batches: int | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Cycle over `num_batches` batches already on the device; token-MIM masks are drawn up front, as a
    data loader's workers would (BEiT), so that host-side block masking is not timed."""
    gen = torch.Generator().manual_seed(bc.seed)
    batches = []
    for _ in range(num_batches or bc.num_batches):
        b = synthetic_batch(cfg, batch, bc.text_len, gen)
        if "mim_token" in obj.objectives:
            b["mim_token_mask"] = token_mim_mask(
                batch,
                cfg.grid_size,
                obj.mim_token_mask_ratio,
                obj.mim_token_masking,
                torch.device("cpu"),
                gen,
            )
        batches.append(batch_to_device(b, bc.device, dtype))
    while True:
        yield from batches


def pipeline_batches(
    cfg: EVEConfig, batch: int, bc: BenchConfig, dtype: torch.dtype
) -> Iterator[dict[str, Tensor]]:
    """The real input pipeline (eve_ds.data) over the synthetic shard corpus."""
    try:
        from eve_ds.data import build_train_loader, load_tokenizer
        from eve_ds.data.config import DataConfig
    except ImportError as e:
        raise RuntimeError(
            f"--data pipeline needs eve_ds.data.build_train_loader ({e}); use --data memory"
        ) from e
    data_cfg = DataConfig(synthetic=True, synthetic_num_train=2000)  # generated once into the cache dir
    loader = build_train_loader(
        data_cfg,
        image_size=cfg.image_size,
        max_text_len=cfg.max_text_len,
        batch_size=batch,
        rank=0,
        world_size=1,
        seed=bc.seed,
        start_batch=0,
        tokenizer=load_tokenizer(data_cfg.tokenizer),
    )
    while True:
        for b in loader:
            yield batch_to_device({k: b[k] for k in ("image", "text_ids", "text_mask")}, bc.device, dtype)


# -- engine ----------------------------------------------------------------------------------------------


def build_model(cfg: EVEConfig, obj: ObjectiveConfig, seed: int) -> PretrainingModel:
    torch.manual_seed(seed)
    return PretrainingModel(cfg, obj)


def build_bench_engine(bc: BenchConfig, cfg: EVEConfig, obj: ObjectiveConfig, micro_batch: int):
    """The trainer's own `build_engine` (DeepSpeed, ZeRO stage from the DS config, torch AdamW) on a run
    config made for this task set. -> (engine, input dtype)."""
    from eve_ds.data.config import DataConfig
    from eve_ds.train.config import RunConfig, TrainConfig
    from eve_ds.train.engine import build_engine, load_ds_file

    ds_name = bc.ds_config_name()
    ds = load_ds_file(ds_name)
    if ds.get("zero_optimization", {}).get("stage") != bc.zero_stage:
        ds_name = _ds_file_with_stage(ds, bc.zero_stage)
    train = TrainConfig(
        micro_batch_size=micro_batch,
        global_batch_size=micro_batch,
        ds_config=ds_name,
        device=bc.device,
        seed=bc.seed,
        max_steps=10**6,
        zero_grad_norm=bc.zero_grad_norm,
        compile=bc.compile if bc.compile == "blocks" else False,
        compile_backend=bc.compile_backend,
        compile_mode=bc.compile_mode,
    )
    run = RunConfig(
        model=cfg,
        objective=obj,
        data=DataConfig(synthetic=True),
        train=train,
        model_flavor=bc.model,
        name="benchmark",
    )
    model = build_model(cfg, obj, bc.seed)
    engine, _, _, _ = build_engine(run, model, world_size=1, device=bc.device)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    return engine, dtype


def _ds_file_with_stage(ds: dict, stage: int) -> str:
    import json
    import tempfile

    ds = {**ds, "zero_optimization": {**ds.get("zero_optimization", {}), "stage": stage}}
    if stage < 2:
        for key in ("contiguous_gradients", "overlap_comm", "reduce_scatter"):
            ds["zero_optimization"].pop(key, None)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"zero{stage}_", delete=False) as f:
        json.dump(ds, f)
    return f.name


def train_step(engine, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    out = engine(batch)
    engine.backward(out["loss"])
    engine.step()
    return out


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- max batch -------------------------------------------------------------------------------------------


def is_oom(e: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(e, torch.cuda.OutOfMemoryError) or should_reduce_batch_size(e)


def free_memory() -> None:
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


def search_max_batch(fits: Callable[[int], bool], start: int, limit: int, granularity: int) -> int:
    """Largest b <= limit with fits(b) (assumed monotone in b): double from `start` until a failure, then
    bisect the bracket until it is `granularity` wide (exact below 8 x granularity). -> 0 when not even 1
    fits."""
    lo, hi, b = 0, None, min(start, limit)
    while hi is None:  # grow
        if not fits(b):
            hi = b
        elif b == limit:
            return b
        else:
            lo, b = b, min(2 * b, limit)
    while hi - lo > max(1, min(granularity, lo // 8)):  # bisect; small batches exactly
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class Prober:
    """Runs two training steps at a batch size on a reusable engine; after an out-of-memory error the
    engine is rebuilt (an interrupted ZeRO-2 backward leaves its gradient buckets half-filled)."""

    def __init__(
        self, make_engine: Callable[[], tuple], cfg: EVEConfig, obj: ObjectiveConfig, bc: BenchConfig
    ) -> None:
        self.make_engine, self.cfg, self.obj, self.bc = make_engine, cfg, obj, bc
        self.engine, self.dtype = make_engine()
        self.tried: dict[int, bool] = {}

    def __call__(self, batch: int) -> bool:
        if batch in self.tried:
            return self.tried[batch]
        data = memory_batches(self.cfg, self.obj, batch, self.bc, self.dtype, num_batches=1)
        try:
            for _ in range(2):  # the first step allocates the optimizer states
                train_step(self.engine, next(data))
            synchronize(self.bc.device)
            ok = True
        except Exception as e:
            if not is_oom(e):
                raise
            ok = False
        del data
        if not ok:
            self.engine = None
            free_memory()
            self.engine, self.dtype = self.make_engine()
        free_memory()
        logger.info("  batch %d: %s", batch, "fits" if ok else "out of memory")
        self.tried[batch] = ok
        return ok


# -- one row ---------------------------------------------------------------------------------------------


def time_steps(engine, data: Iterator[dict[str, Tensor]], bc: BenchConfig) -> tuple[list[float], dict]:
    """-> (median-able list of per-window mean step times, last losses)."""
    out = {}
    for _ in range(bc.warmup_steps):
        out = train_step(engine, next(data))
    synchronize(bc.device)
    windows = []
    for _ in range(bc.windows):
        t0 = time.perf_counter()
        for _ in range(bc.steps_per_window):
            out = train_step(engine, next(data))
        synchronize(bc.device)
        windows.append((time.perf_counter() - t0) / bc.steps_per_window)
    losses = {k: float(v.detach()) for k, v in out.items() if k.endswith("_loss") or k == "loss"}
    return windows, losses


def run_row(bc: BenchConfig, task_set: list[str], paper: PaperRows | None = None) -> RowResult:
    cfg = bc.model_config()
    obj = ObjectiveConfig(objectives=list(task_set))
    obj.validate()
    if bc.batch_size is not None or bc.device != "cuda":
        batch, source = bc.batch_size or BenchConfig.CPU_DEFAULT_BATCH, "fixed"
        engine, dtype = build_bench_engine(bc, cfg, obj, batch)
    else:
        prober = Prober(lambda: build_bench_engine(bc, cfg, obj, 1), cfg, obj, bc)
        batch = search_max_batch(prober, 32, bc.max_batch_limit, bc.batch_granularity)
        if batch == 0:
            raise RuntimeError(f"{'+'.join(task_set)}: not even a batch of 1 fits on this device")
        source = "search"
        engine, dtype = prober.engine, prober.dtype
    if bc.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    data = (
        memory_batches(cfg, obj, batch, bc, dtype)
        if bc.data == "memory"
        else pipeline_batches(cfg, batch, bc, dtype)
    )
    windows, losses = time_steps(engine, data, bc)
    step = statistics.median(windows)
    pps = batch / step
    gflops = flops_per_pair(cfg, obj, TextShape(cfg.max_text_len, bc.text_len), batch) / 1e9
    peak = (
        bc.peak_tflops
        if bc.peak_tflops is not None
        else (peak_tflops(torch.cuda.get_device_name()) if bc.device == "cuda" else None)
    )
    achieved = pps * gflops / 1e3
    mem = torch.cuda.max_memory_allocated() / 2**30 if bc.device == "cuda" else None
    del engine, data
    gc.collect()
    with contextlib.suppress(Exception):
        free_memory()
    return RowResult(
        task_set=list(task_set),
        max_micro_batch=batch,
        batch_source=source,
        step_time_s=step,
        window_step_times_s=windows,
        pairs_per_s=pps,
        hours_per_epoch=bc.corpus_size / (pps * bc.num_gpus) / 3600,
        gflops_per_pair=gflops,
        achieved_tflops=achieved,
        mfu=achieved / peak if peak else None,
        peak_memory_gib=mem,
        losses=losses,
        paper=paper(task_set) if paper else None,
    )


def run_benchmark(
    bc: BenchConfig,
    progress: Callable[[int, RowResult], None] | None = None,
    paper: PaperRows | None = None,
) -> list[RowResult]:
    """Every task set of `bc`, with the ratios to MSM; `paper` gives the paper's row of a task set."""
    rows = []
    for i, ts in enumerate(bc.task_sets):
        logger.info("[%d/%d] %s ...", i + 1, len(bc.task_sets), "+".join(ts))
        rows.append(run_row(bc, ts, paper))
        if progress:
            progress(i, rows[-1])
    return with_ratios(rows)


def with_ratios(rows: list[RowResult]) -> list[RowResult]:
    """Fill ratio_to_msm / batch_ratio_to_msm from the MSM row (None without one)."""
    msm = next((r for r in rows if tuple(r.task_set) == MSM), None)
    for r in rows:
        if msm is not None:
            r.ratio_to_msm = msm.pairs_per_s / r.pairs_per_s
            r.batch_ratio_to_msm = msm.max_micro_batch / r.max_micro_batch
    return rows
