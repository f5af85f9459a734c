"""`eve-profile`: where a training step's time goes — by model region, by step part, by operator.

    eve-profile --model eve_base --batch-size 64 --task-set mlm,mim_pixel --device cuda --dtype bf16 \\
        --json profile.json

Prints (and writes with --json):
  * the device time of every model region per training step (each call replayed on its own, forward +
    backward: `eve_ds.bench.profile`), with their sum;
  * the DeepSpeed engine's step (ZeRO stage of the benchmark's DeepSpeed config) split into forward,
    backward and optimizer step, and the host-to-device copy of one batch;
  * with --ops, torch.profiler's operator table of one forward + backward (self device time on CUDA).

With --count it instead counts what one DeepSpeed training step dispatches (`eve_ds.bench.count`): ATen
ops and would-be host syncs (file:line) per phase, and the graph breaks of each block kind (hard / soft
router) in every encoder pass. --compile blocks compiles the engine's blocks (train.compile): the step split
then times compiled blocks; the count sees the ATen ops that the compiled graphs still dispatch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from eve_ds.bench.count import count_train_step, cuda_sync_warnings, format_counts
from eve_ds.bench.profile import operator_table, profile_engine, profile_regions
from eve_ds.bench.report import device_info, git_revision, versions
from eve_ds.bench.throughput import BenchConfig
from eve_ds.models.config import FLAVORS
from eve_ds.objectives import ObjectiveConfig
from eve_ds.train.distributed import init_distributed
from eve_ds.utils.io import atomic_write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eve-profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="eve_tiny", choices=sorted(FLAVORS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--task-set", default="mlm,mim_pixel")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--reps", type=int, default=10, help="timed repeats per region call")
    p.add_argument("--steps", type=int, default=5, help="timed engine steps for the step split")
    p.add_argument("--no-engine", action="store_true", help="skip the DeepSpeed step split")
    p.add_argument("--ops", action="store_true", help="also print torch.profiler's operator table")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--count",
        action="store_true",
        help="instead: count ATen ops and would-be host syncs of one training step (eve_ds.bench.count)",
    )
    p.add_argument("--ds-config", default="zero2_bf16", help="DeepSpeed config for --count")
    p.add_argument(
        "--zero-grad-norm",
        default="deepspeed",
        choices=["deepspeed", "foreach"],
        help="train.zero_grad_norm of the engine (step split, --count, --sync-warn)",
    )
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "blocks"],
        help="train.compile of the engine (step split, --count)",
    )
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="train.compile_mode (reduce-overhead: CUDA graphs)",
    )
    p.add_argument(
        "--sync-warn",
        type=int,
        default=None,
        metavar="STEPS",
        help="instead: STEPS training steps under torch.cuda.set_sync_debug_mode('warn'), warnings by site",
    )
    return p.parse_args(argv)


def print_regions(result: dict) -> None:
    print(
        f"{result['model']} {'+'.join(result['task_set'])} batch {result['batch_size']} {result['dtype']} "
        f"{result['overrides'] or ''}"
    )
    print("device time per training step, region by region (forward + backward, each call on its own):")
    for k, v in sorted(result["regions_ms"].items(), key=lambda kv: -kv[1]["ms"]):
        print(f"  {k:28s} {v['ms']:9.2f} ms  ({v['calls']} calls)")
    print(f"  {'sum of regions':28s} {result['regions_sum_ms']:9.2f} ms")
    print(f"  {'host-to-device batch copy':28s} {result['h2d_ms']:9.2f} ms")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.sync_warn and args.device != "cuda":
        raise SystemExit("eve-profile: --sync-warn needs --device cuda (torch.cuda.set_sync_debug_mode)")
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    bc = BenchConfig(
        model=args.model,
        device=args.device,
        model_overrides=args.set,
        zero_grad_norm=args.zero_grad_norm,
        compile=args.compile,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
    )
    obj = ObjectiveConfig(objectives=args.task_set.split(","))
    init_distributed(args.device, timeout_s=600)
    if args.count or args.sync_warn:
        return count_main(args, argv)
    result = profile_regions(bc, obj, args.batch_size, dtype, args.reps)
    print_regions(result)
    if args.ops:
        print(operator_table(bc, obj, args.batch_size, dtype, args.top))
    if not args.no_engine:
        result |= profile_engine(bc, obj, args.batch_size, args.steps)
        print("DeepSpeed engine step, synchronised between parts:")
        for k, v in result["engine_step_ms"].items():
            print(f"  {k:28s} {v:9.2f} ms")
        print(f"  {'total':28s} {result['engine_step_total_ms']:9.2f} ms")
    result["meta"] = meta(args, argv)
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def meta(args: argparse.Namespace, argv: list[str] | None) -> dict:
    commit, dirty = git_revision()
    return {
        "device": device_info(args.device),
        "versions": versions(),
        "git_revision": commit,
        "git_dirty": dirty,
        "command": "eve-profile " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


def count_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """--count: ops and syncs per phase of one DeepSpeed training step, printed and (--json) written."""
    bc = BenchConfig(
        model=args.model,
        device=args.device,
        ds_config=args.ds_config,
        model_overrides=args.set,
        zero_grad_norm=args.zero_grad_norm,
        compile=args.compile,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
    )
    t0 = time.perf_counter()
    result = {
        "model": args.model,
        "task_set": args.task_set.split(","),
        "batch_size": args.batch_size,
        "ds_config": args.ds_config,
        "overrides": args.set,
        "zero_grad_norm": args.zero_grad_norm,
        "compile": args.compile,
    }
    tasks = args.task_set.split(",")
    if args.sync_warn:
        result |= cuda_sync_warnings(bc, tasks, args.batch_size, args.sync_warn)
    else:
        result |= count_train_step(bc, tasks, args.batch_size)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["meta"] = meta(args, argv)
    print(f"{args.model} {args.task_set} batch {args.batch_size} {args.ds_config} {args.set or ''}")
    if args.sync_warn:
        print(f"{result['num_warnings']} sync warnings in {args.sync_warn} steps")
        for site, n in result["sites"]:
            print(f"  {n:4d} x {site}")
    else:
        print(format_counts(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
