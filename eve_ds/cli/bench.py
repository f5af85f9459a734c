"""`eve-bench` (or `python tools/benchmark_pretrain.py`): pre-training throughput per task set (the paper's
Table 1).

    eve-bench --model eve_tiny --quick                                         # smoke test: prints the table
    eve-bench --model eve_tiny --json benchmarks/results/table1-cpu.json \\
        --markdown benchmarks/results/table1-cpu.md
    eve-bench --model eve_base --device cuda --json results/table1-h100.json \\
        --markdown results/table1-h100.md                                     # max batch searched
    eve-bench --family evlm --json benchmarks/results/evlm-efficiency-cpu.json \\
        --markdown benchmarks/results/evlm-efficiency-cpu.md          # EVLM: cross-attention vs concat
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from eve_ds.bench.report import merge, meta_info, task_label, to_json, to_markdown
from eve_ds.bench.throughput import DEFAULT_TASK_SETS, BenchConfig, RowResult, run_benchmark
from eve_ds.models.config import FLAVORS
from eve_ds.repro import paper
from eve_ds.train.distributed import resolve_device
from eve_ds.utils.errors import UserError, cli_main
from eve_ds.utils.io import atomic_write_text
from eve_ds.utils.task_sets import format_task_sets, parse_task_sets

logger = logging.getLogger("eve_ds.bench")


def prog_name() -> str:
    """The command that ran, for usage and the table's footer: the script when run as one."""
    script = os.path.basename(sys.argv[0] if sys.argv else "")
    return f"python tools/{script}" if script == "benchmark_pretrain.py" else "eve-bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog=prog_name(),
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    d = BenchConfig()
    p.add_argument(
        "--family",
        default="eve",
        choices=["eve", "evlm"],
        help="eve: Table 1 throughput per task set; evlm: EVLM's cross-attention vs concatenation at the "
        "paper's two settings (FLOPs ratio and measured time ratio, CPU; --batch-size, --warmup-steps, "
        "--windows x --steps-per-window timed steps, --quick, --threads, --json, --markdown apply)",
    )
    p.add_argument("--model", default=d.model, choices=sorted(FLAVORS))
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batch 4, 1 warm-up step, 2 windows of 1 step (seconds per row)",
    )
    p.add_argument(
        "--task-sets",
        nargs="+",
        default=None,
        metavar="A,B",
        help="task sets, e.g. --task-sets mlm,mim_pixel mlm,itc,itm ('a,b;c,d' works too; default: the "
        f"paper's rows + MLM alone: {format_task_sets(DEFAULT_TASK_SETS)})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"fixed micro-batch (no search); default: searched on CUDA, "
        f"{BenchConfig.CPU_DEFAULT_BATCH} on CPU",
    )
    p.add_argument("--max-batch-limit", type=int, default=d.max_batch_limit)
    p.add_argument(
        "--batch-granularity",
        type=int,
        default=d.batch_granularity,
        help="the max-batch search stops when its bracket is this narrow",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. --set expert_impl=loop (repeatable)",
    )
    add_run_args(p, d)
    return p.parse_args(argv)


def add_run_args(p: argparse.ArgumentParser, d: BenchConfig) -> None:
    """The engine, data, timing and output options."""
    p.add_argument("--zero-stage", type=int, default=d.zero_stage, choices=[0, 1, 2])
    p.add_argument("--ds-config", default=None, help="ds_configs/ name (default: zero2_bf16 / zero2_cpu)")
    p.add_argument(
        "--data",
        default=d.data,
        choices=["memory", "pipeline"],
        help="memory: pre-built batches on the device (model speed); pipeline: eve_ds.data loader "
        "over the synthetic shards",
    )
    p.add_argument("--text-len", type=int, default=d.text_len, help="real tokens per synthetic caption")
    p.add_argument("--zero-grad-norm", default=d.zero_grad_norm, choices=["deepspeed", "foreach"])
    p.add_argument("--compile", default=d.compile, choices=["off", "blocks"], help="train.compile")
    p.add_argument("--compile-backend", default=d.compile_backend, choices=["inductor", "aot_eager"])
    p.add_argument(
        "--compile-mode",
        default=d.compile_mode,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="train.compile_mode (reduce-overhead: CUDA graphs)",
    )
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--windows", type=int, default=d.windows)
    p.add_argument("--steps-per-window", type=int, default=d.steps_per_window)
    p.add_argument("--corpus-size", type=int, default=d.corpus_size, help="pairs per epoch")
    p.add_argument("--num-gpus", type=int, default=d.num_gpus, help="GPUs for the hours-per-epoch column")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak bf16 TFLOP/s")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: combine the rows of earlier runs (e.g. one per 10-minute GPU job) "
        "into one table; ratios are recomputed against the MSM row",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the JSON record here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown table here")


def bench_config(args: argparse.Namespace) -> BenchConfig:
    try:
        device = resolve_device(args.device or "auto")
    except RuntimeError as e:
        raise UserError(f"--device: {e}") from e
    bc = BenchConfig(
        model=args.model,
        device=device,
        batch_size=args.batch_size,
        max_batch_limit=args.max_batch_limit,
        batch_granularity=args.batch_granularity,
        model_overrides=args.set,
        zero_stage=args.zero_stage,
        ds_config=args.ds_config,
        data=args.data,
        text_len=args.text_len,
        warmup_steps=args.warmup_steps,
        windows=args.windows,
        steps_per_window=args.steps_per_window,
        corpus_size=args.corpus_size,
        num_gpus=args.num_gpus,
        peak_tflops=args.peak_tflops,
        zero_grad_norm=args.zero_grad_norm,
        compile=args.compile,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
    )
    if args.task_sets:
        bc.task_sets = parse_task_sets(args.task_sets)
    if args.quick:
        bc.batch_size = bc.batch_size or 4
        bc.warmup_steps, bc.windows, bc.steps_per_window, bc.num_batches = 1, 2, 1, 1
    return bc


def write(args: argparse.Namespace, bc: BenchConfig, rows: list[RowResult], meta: dict) -> None:
    md = to_markdown(bc, rows, meta)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = to_json(bc, rows, meta, paper.TABLE1_RATIOS)
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.markdown, md)


@cli_main("eve-bench")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        try:
            write(args, *merge(args.merge))
        except (ValueError, OSError) as e:
            raise UserError(f"--merge: {e}") from e
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
    logging.getLogger("eve_ds").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family == "evlm":
        return evlm_main(args, argv)
    bc = bench_config(args)
    from eve_ds.train.distributed import init_distributed

    init_distributed(bc.device, timeout_s=600)

    def progress(i: int, r: RowResult) -> None:
        hours = f"  {r.hours_per_epoch:7.2f} h/epoch" if bc.device == "cuda" else ""  # GPUs only
        logger.info(
            "[%d/%d] %-36s batch %4d  %9.1f pairs/s%s  %7.1f GFLOPs/pair%s",
            i + 1,
            len(bc.task_sets),
            task_label(r.task_set),
            r.max_micro_batch,
            r.pairs_per_s,
            hours,
            r.gflops_per_pair,
            f"  MFU {100 * r.mfu:.1f}%" if r.mfu else "",
        )

    rows = run_benchmark(bc, progress, paper.table1_row)
    write(args, bc, rows, meta_info(bc, argv, prog_name()))
    return 0


def evlm_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """`eve-bench --family evlm`: the efficiency record of `bench/evlm_efficiency.py`, printed and written."""
    from eve_ds.bench.evlm_efficiency import EfficiencyConfig, run_efficiency, to_markdown
    from eve_ds.train.distributed import init_distributed

    if (args.device or "cpu") != "cpu":
        raise UserError("--family evlm: --device cuda is not supported yet (the CPU measurement only)")
    ec = EfficiencyConfig(warmup_steps=args.warmup_steps, steps=args.windows * args.steps_per_window)
    ec.batch = args.batch_size or ec.batch
    if args.quick:
        ec.warmup_steps, ec.steps = 1, 2
    init_distributed("cpu", timeout_s=600)
    record = run_efficiency(
        ec, lambda r: logger.info("%s: step time ratio %.3f", r["setting"], r["step_time_ratio"])
    )
    record["meta"] = meta_info(SimpleNamespace(device="cpu"), argv, prog_name())
    md = to_markdown(record, record["meta"]["command"])
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.markdown, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
