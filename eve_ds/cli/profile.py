"""`eve-profile`: where a training step's time goes, by model region and by operator (torch.profiler).

    eve-profile --model eve_base --batch-size 4 --task-set mlm,mim_pixel --device cuda

Regions are labelled from outside the model (forward hooks open a `record_function` per module), so the
model code stays free of profiling calls. Forward + backward of the plain module (no optimizer step).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from eve_ds.bench.table1 import BenchConfig, build_model, memory_batches
from eve_ds.models.config import FLAVORS, get_config
from eve_ds.models.heads import MLMHead, PixelDecoder
from eve_ds.models.layers import Attention, HardRouterFFN, SoftRouterFFN
from eve_ds.objectives import ObjectiveConfig

REGIONS = {
    Attention: "attention",
    HardRouterFFN: "hard-router FFN",
    SoftRouterFFN: "soft-router FFN (MoE)",
    MLMHead: "MLM head",
    PixelDecoder: "pixel decoder",
}


def label_regions(model: nn.Module) -> list:
    """Wrap the forward of every module of a REGIONS type in record_function(region)."""
    handles = []
    for m in model.modules():
        name = next((n for t, n in REGIONS.items() if isinstance(m, t)), None)
        if name is None:
            continue

        def pre(mod, args, _name=name):
            mod._rf = record_function(f"region::{_name}")
            mod._rf.__enter__()

        def post(mod, args, out):
            mod._rf.__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eve-profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="eve_tiny", choices=sorted(FLAVORS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--task-set", default="mlm,mim_pixel")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    cfg = get_config(args.model)
    obj = ObjectiveConfig(objectives=args.task_set.split(","))
    model = build_model(cfg, obj, 0).to(args.device)
    bc = BenchConfig(model=args.model, device=args.device)
    data = memory_batches(cfg, obj, args.batch_size, bc, torch.float32, num_batches=1)
    model(next(data))["loss"].backward()  # warm-up
    handles = label_regions(model)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            out = model(next(data))
            out["loss"].backward()
    wall = (time.perf_counter() - t0) / args.steps
    for h in handles:
        h.remove()
    events = prof.key_averages()
    regions = defaultdict(float)
    for e in events:
        if e.key.startswith("region::"):
            regions[e.key[8:]] += e.cpu_time_total / 1e3 / args.steps
    print(f"{args.model} {args.task_set} batch {args.batch_size}: {wall * 1e3:.0f} ms per forward+backward")
    print("forward time by region (ms/step, inclusive):")
    for k, v in sorted(regions.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v:9.1f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
