"""Where a training step's device time goes.

Three measurements, each with device-side timing (CUDA events; the host clock on CPU):

* `region_times`: every call of a model region in one training step (attention, hard-router FFN, soft-router
  FFN, heads) is captured with its real inputs, then replayed on its own, forward + backward, and timed
  (median over repeats). Regions are timed in isolation, so their sum leaves out what lies between them
  (embeddings, masking, losses, launch gaps): the step split below shows how much that is.
* `step_split`: the DeepSpeed engine's training step cut into forward, backward and optimizer step, with a
  synchronisation between the parts (which removes their overlap, so the parts add up to a little more than
  an unsplit step).
* `h2d_time`: copying one batch in the data loader's format (uint8 images, int64 ids) to the device.

Model code stays free of timing calls: regions are found by module type.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eve_ds.bench.throughput import BenchConfig, build_bench_engine, build_model, memory_batches
from eve_ds.models.config import EVEConfig
from eve_ds.models.heads import MLMHead, PixelDecoder
from eve_ds.models.layers import Attention, HardRouterFFN, SoftRouterFFN
from eve_ds.objectives import ObjectiveConfig

REGIONS: dict[type, str] = {
    Attention: "attention",
    HardRouterFFN: "hard-router FFN",
    SoftRouterFFN: "soft-router FFN (MoE)",
    MLMHead: "MLM head",
    PixelDecoder: "pixel decoder",
}


@dataclass
class Call:
    region: str
    module: nn.Module
    args: tuple


def region_of(module: nn.Module) -> str | None:
    return next((name for t, name in REGIONS.items() if isinstance(module, t)), None)


def _leaf(x):
    """A captured input: tensors detached (float ones requiring grad, like activations), others as they are."""
    if isinstance(x, Tensor):
        return x.detach().clone().requires_grad_(x.is_floating_point())
    return x


def capture_calls(model: nn.Module, run: Callable[[], object]) -> list[Call]:
    """Every call of a region module made by `run()` (one forward pass), with copies of its inputs."""
    calls: list[Call] = []

    def hook(module, args):
        calls.append(Call(region_of(module), module, tuple(_leaf(a) for a in args)))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if region_of(m)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _outputs(out) -> list[Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, Tensor) and t.requires_grad]


class Timer:
    """Elapsed milliseconds of a callable: CUDA events on a CUDA device, the host clock otherwise."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
        """Median over `reps` calls of fn, after `warmup` calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def time_call(call: Call, timer: Timer, reps: int) -> float:
    """Forward + backward of one captured call, in ms (random output gradients)."""
    # With grad enabled: outputs made under no_grad do not require grad, and there would be no backward.
    probe = _outputs(call.module(*call.args))
    gen = torch.Generator(device=probe[0].device).manual_seed(0) if probe else None
    grads = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in probe]
    del probe

    def fwd_bwd():
        outs = _outputs(call.module(*call.args))
        if outs:
            torch.autograd.backward(outs, grads)

    return timer(fwd_bwd, reps)


def region_times(model: nn.Module, run: Callable[[], object], device: str, reps: int = 10) -> dict[str, dict]:
    """{region: {"ms": forward+backward ms per training step, "calls": calls per step}} for every region
    that `run()` (one forward pass of the whole model) calls."""
    timer = Timer(device)
    calls = capture_calls(model, run)
    out: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "calls": 0})
    for call in calls:
        out[call.region]["ms"] += time_call(call, timer, reps)
        out[call.region]["calls"] += 1
    model.zero_grad(set_to_none=True)
    return dict(out)


def step_split(
    engine, data: Iterator[dict], device: str, steps: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Median ms of the engine's forward, backward and optimizer step (synchronised between the parts)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    parts: dict[str, list[float]] = defaultdict(list)
    for i in range(warmup + steps):
        batch = next(data)
        sync()
        t0 = time.perf_counter()
        out = engine(batch)
        sync()
        t1 = time.perf_counter()
        engine.backward(out["loss"])
        sync()
        t2 = time.perf_counter()
        engine.step()
        sync()
        t3 = time.perf_counter()
        if i >= warmup:
            for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer step", t3 - t2)):
                parts[k].append(v * 1e3)
    return {k: statistics.median(v) for k, v in parts.items()}


def h2d_time(cfg: EVEConfig, batch: int, device: str, pin: bool = True, reps: int = 10) -> float:
    """ms to copy one data-loader batch (uint8 images, int64 text ids and mask) to `device`."""
    g = torch.Generator().manual_seed(0)
    host = {
        "image": torch.randint(
            0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g
        ),
        "text_ids": torch.randint(0, cfg.vocab_size, (batch, cfg.max_text_len), generator=g),
        "text_mask": torch.ones(batch, cfg.max_text_len, dtype=torch.long),
    }
    if pin and device == "cuda":
        host = {k: v.pin_memory() for k, v in host.items()}
    return Timer(device)(lambda: {k: v.to(device, non_blocking=True) for k, v in host.items()}, reps)


# -- one profile of a model: what `eve-profile` prints --------------------------------------------------


def profile_regions(bc: BenchConfig, obj: ObjectiveConfig, batch_size: int, dtype, reps: int) -> dict:
    """Region times and the host-to-device batch copy of one training step of the plain module (no
    engine), on `bc.device`."""
    cfg = bc.model_config()
    model = build_model(cfg, obj, 0).to(bc.device, dtype)
    batch = next(memory_batches(cfg, obj, batch_size, bc, dtype, num_batches=1))
    gen = torch.Generator(device=bc.device)
    regions = region_times(model, lambda: model(batch, generator=gen.manual_seed(0)), bc.device, reps)
    return {
        "model": bc.model,
        "task_set": obj.objectives,
        "batch_size": batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "overrides": bc.model_overrides,
        "regions_ms": regions,
        "regions_sum_ms": sum(r["ms"] for r in regions.values()),
        "h2d_ms": h2d_time(cfg, batch_size, bc.device),
    }


def operator_table(bc: BenchConfig, obj: ObjectiveConfig, batch_size: int, dtype, top: int) -> str:
    """torch.profiler's operator table of one forward + backward (self device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = bc.model_config()
    model = build_model(cfg, obj, 0).to(bc.device, dtype)
    batch = next(memory_batches(cfg, obj, batch_size, bc, dtype, num_batches=1))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bc.device == "cuda" else [])
    with profile(activities=acts) as prof:
        model(batch, generator=torch.Generator(device=bc.device).manual_seed(0))["loss"].backward()
    sort = "self_cuda_time_total" if bc.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top)


def profile_engine(bc: BenchConfig, obj: ObjectiveConfig, batch_size: int, steps: int) -> dict:
    """The DeepSpeed engine's step split into forward, backward and optimizer step, and peak memory."""
    if bc.device == "cuda":
        torch.cuda.empty_cache()
    cfg = bc.model_config()
    engine, dtype = build_bench_engine(bc, cfg, obj, batch_size)
    split = step_split(engine, memory_batches(cfg, obj, batch_size, bc, dtype), bc.device, steps)
    return {
        "engine_step_ms": split,
        "engine_step_total_ms": sum(split.values()),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if bc.device == "cuda" else None,
    }
