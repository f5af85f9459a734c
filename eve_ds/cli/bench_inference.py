"""`eve-bench-inference`: VQA inference speed and parameters per token next to the paper's Table 9.

    eve-bench-inference --models eve_tiny eve_base --device cpu --batch-size 8 \\
        --json benchmarks/results/table9-cpu.json --markdown benchmarks/results/table9-cpu.md
    eve-bench-inference --models eve_base eve_large --device cuda --batch-size 256 \\
        --questions DATA/vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json --json table9-gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from eve_ds.bench.inference import InferenceBenchConfig, run_inference_bench, to_markdown
from eve_ds.bench.report import device_info, git_revision, versions
from eve_ds.models.config import FLAVORS
from eve_ds.repro import paper
from eve_ds.train.distributed import resolve_device

logger = logging.getLogger("eve_ds.bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="eve-bench-inference",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    d = InferenceBenchConfig()
    p.add_argument("--models", nargs="+", default=d.models, choices=sorted(FLAVORS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-batches", type=int, default=d.num_batches, help="timed batches per window")
    p.add_argument("--windows", type=int, default=d.windows, help="the fastest window is reported")
    p.add_argument("--warmup-batches", type=int, default=d.warmup_batches)
    p.add_argument("--questions", default=None, help="VQA v2 questions JSON (default: a fixed question)")
    p.add_argument("--text-len", type=int, default=d.text_len, help="tokens of the fixed question")
    p.add_argument("--num-gpus", type=int, default=d.num_gpus, help="devices for the scaled minutes column")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", required=True, type=Path, help="write the JSON record here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"eve-bench-inference: {e}") from e
    bc = InferenceBenchConfig(
        models=args.models,
        device=device,
        batch_size=args.batch_size,
        num_batches=args.num_batches,
        windows=args.windows,
        warmup_batches=args.warmup_batches,
        questions=args.questions,
        text_len=args.text_len,
        num_gpus=args.num_gpus,
    )
    rows = run_inference_bench(
        bc, lambda r: logger.info("%s: %.1f questions/s", r["model"], r["questions_per_s"])
    )
    dev = device_info(device)
    commit, dirty = git_revision()
    command = "eve-bench-inference " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {"device": dev, "device_name": dev["name"], "versions": versions(), "git_commit": commit}
    meta.update(git_dirty=dirty, command=command)
    md = to_markdown(bc, rows, paper.table9_rows(), meta)
    print(md)
    record = {"config": dataclasses.asdict(bc), "rows": rows, "paper": paper.table9_rows()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**record, "meta": meta}, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
