"""`eve-evaluate`: validation metrics of a checkpoint (run dir, DeepSpeed tag dir or native export).

eve-evaluate --checkpoint RUN_DIR [--json]      # what the run validated on, as its validation did
eve-evaluate --checkpoint RUN_DIR|TAG_DIR|EXPORT_DIR --data SHARDS        # pre-training: other shards
eve-evaluate --checkpoint RUN_DIR --task vqa --data-root DIR --split test-dev --predictions FILE
eve-evaluate --checkpoint runs/evlm_tiny_synthetic --task evlm_synthetic    # EVLM: captions, VQA, POPE
eve-evaluate --checkpoint RUN --task gqa|textvqa|pope|mme|mmbench|vqav2 --data-root DIR \
    --output metrics.json --predictions answers.jsonl                        # EVLM on a benchmark
"""

from __future__ import annotations

import argparse
import json

from eve_ds.tasks.config import BENCHMARK_TASKS
from eve_ds.train.evaluation import EvalRequest, evaluate_checkpoint
from eve_ds.train.metrics import setup_logging
from eve_ds.utils.errors import cli_main
from eve_ds.utils.io import atomic_write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--checkpoint", required=True, help="run dir, DeepSpeed tag dir or native export dir")
    p.add_argument(
        "--task",
        choices=["msm", "vqa", "retrieval", "nlvr2", "evlm_synthetic", *BENCHMARK_TASKS],
        default=None,
        help="default: the run's task",
    )
    p.add_argument("--data", help="msm: validation shards (a shard directory or brace spec)")
    p.add_argument("--data-root", help="downstream task: the dataset's files as distributed")
    p.add_argument(
        "--split",
        help="vqa: minival | val | test-dev | test; retrieval: val | test; nlvr2: dev | test1 "
        "(default: the run's task.eval_split); EVLM benchmarks: vqav2 val | test-dev, gqa testdev | val, "
        "textvqa val, pope random | popular | adversarial | all, mmbench DEV_EN | DEV_CN | FILE.tsv "
        "(default: the first)",
    )
    p.add_argument("--dataset", default=None, choices=["coco", "flickr30k"], help="retrieval")
    p.add_argument("--rerank-k", type=int, default=None, help="retrieval: ITC top-k re-scored by ITM")
    p.add_argument(
        "--predictions",
        help="vqa, vqav2: write the EvalAI file [{question_id, answer}] here; other EVLM benchmarks: "
        "the answer to every question (JSON lines)",
    )
    p.add_argument(
        "--prompt-format",
        choices=["auto", "plain", "sft", "chat"],
        default=None,
        help="EVLM benchmarks: plain ([media] prompt), sft ([media] user: prompt assistant:, as the SFT "
        "rows), chat (the LM tokenizer's chat template); auto (default): sft for a stage3 run, else plain",
    )
    p.add_argument("--output", help="also write the metrics here (a JSON file, written atomically)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable evaluation images")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's micro-batch")
    p.add_argument(
        "--max-batches", type=int, default=None, help="msm: 0 = the whole set (default: train.eval_batches)"
    )
    p.add_argument("--seed", type=int, default=None, help="msm: the masks' seed (default: train.seed)")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="msm: also report attribute-word accuracy (synthetic corpus); default: from the config",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


@cli_main("eve-evaluate", user_errors=(FileNotFoundError,))
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(0)
    request = EvalRequest(
        task=args.task,
        data=args.data,
        data_root=args.data_root,
        split=args.split,
        dataset=args.dataset,
        rerank_k=args.rerank_k,
        predictions=args.predictions,
        skip_bad_images=args.skip_bad_images,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        seed=args.seed,
        synthetic=args.synthetic,
        prompt_format=args.prompt_format,
    )
    metrics = evaluate_checkpoint(args.checkpoint, request, device=args.device)
    if args.output:
        atomic_write_json(args.output, metrics)
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        for k, v in metrics.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
