"""`eve-predict`: answers of a trained EVE on your own images (a run directory or a native export).

eve-predict --checkpoint DIR --task vqa --image IMG|IMAGE_DIR --question Q [--top-k 5] [--json]
eve-predict --checkpoint DIR --task vqa --inputs LIST.tsv            (lines: image<TAB>question)
eve-predict --checkpoint DIR --task retrieval --images IMG|DIR ... --texts T ... (or --images-file,
            --texts-file: one per line)
eve-predict --checkpoint DIR --task nlvr2 --left L --right R --statement S
eve-predict --checkpoint DIR --task nlvr2 --inputs LIST.tsv          (lines: left<TAB>right<TAB>statement)

Several inputs (a directory, a list file): an unreadable image is reported and the others still
answered. User errors exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from eve_ds.infer import MissingHeadError, NLVR2Judge, Retriever, UnreadableImageError, VQAPredictor
from eve_ds.train.distributed import resolve_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class UserError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--checkpoint", required=True, help="run dir, DeepSpeed tag dir or native export dir")
    p.add_argument("--task", required=True, choices=["vqa", "retrieval", "nlvr2"])
    p.add_argument("--image", help="vqa: an image file or a directory of images")
    p.add_argument("--question", help="vqa: the question (asked of every image of a directory)")
    p.add_argument("--inputs", help="vqa / nlvr2: a tab-separated list file, one input per line")
    p.add_argument("--images", nargs="+", default=[], help="retrieval: image files or directories")
    p.add_argument("--images-file", help="retrieval: a file with one image path per line")
    p.add_argument("--texts", nargs="+", default=[], help="retrieval: the texts")
    p.add_argument("--texts-file", help="retrieval: a file with one text per line")
    p.add_argument("--left", help="nlvr2: the left image")
    p.add_argument("--right", help="nlvr2: the right image")
    p.add_argument("--statement", help="nlvr2: the statement to judge")
    p.add_argument("--top-k", type=int, default=5, help="vqa: answers per question; retrieval: shown")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def image_files(path: str) -> list[str]:
    """A file -> [it]; a directory -> its images, sorted by name."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        return [os.path.join(path, f) for f in files]
    return [path]


def read_lines(path: str, columns: int) -> list[list[str]]:
    """Non-blank lines of a list file split at tabs; relative image paths are taken from its folder."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such list file")
    rows, base = [], os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != columns:
                raise UserError(f"{path} line {n}: expected {columns} tab-separated fields, got {len(parts)}")
            rows.append(parts)
    return [[os.path.join(base, c) if i < columns - 1 else c for i, c in enumerate(r)] for r in rows]


def batches(n: int, size: int, show: bool):
    return tqdm(range(0, n, size), desc="eve-predict", disable=not show or n <= size, file=sys.stderr)


def run_vqa(args, device: str) -> dict:
    if args.inputs:
        rows = read_lines(args.inputs, 2)
        images, questions, single = [r[0] for r in rows], [r[1] for r in rows], False
    elif args.image and args.question:
        images = image_files(args.image)
        questions, single = [args.question] * len(images), not os.path.isdir(args.image)
    else:
        raise UserError("--task vqa needs --image and --question, or --inputs")
    vqa = VQAPredictor.from_pretrained(args.checkpoint, device=device)
    if single:
        answers = vqa.answer(images[0], questions[0], top_k=args.top_k)
        return {"answers": [{"answer": a.answer, "score": a.score} for a in answers]}
    results = []
    for a in batches(len(images), args.batch_size, True):
        got = vqa.answer_batch(
            images[a : a + args.batch_size], questions[a : a + args.batch_size], args.top_k
        )
        for image, question, answers in zip(images[a:], questions[a:], got):
            r = {"image": image, "question": question}
            if answers is None:
                r["error"] = f"cannot read image {image}"
            else:
                r["answers"] = [{"answer": x.answer, "score": x.score} for x in answers]
            results.append(r)
    return {"results": results}


def retrieval_inputs(args) -> tuple[list[str], list[str], bool]:
    """(images, texts, whether several images came from a directory or a list file)."""
    images = [f for p in args.images for f in image_files(p)]
    listed = any(os.path.isdir(p) for p in args.images)
    if args.images_file:
        images += [r[0] for r in read_lines(args.images_file, 1)]
        listed = True
    texts = list(args.texts)
    if args.texts_file:
        if not os.path.isfile(args.texts_file):
            raise UserError(f"{args.texts_file}: no such file")
        with open(args.texts_file, encoding="utf-8") as f:
            texts += [line.strip() for line in f if line.strip()]
    if not images or not texts:
        raise UserError(
            "--task retrieval needs images (--images, --images-file) and texts (--texts, --texts-file)"
        )
    return images, texts, listed


def run_retrieval(args, device: str) -> dict:
    images, texts, listed = retrieval_inputs(args)
    r = Retriever.from_pretrained(args.checkpoint, device=device).rank(
        images, texts, batch_size=args.batch_size, skip_unreadable=listed
    )
    out = {"image_to_text": [], "text_to_image": r.text_to_image, "images": images, "texts": texts}
    rows = iter(r.image_to_text)
    out["image_to_text"] = [[] if i in r.unreadable else next(rows) for i in range(len(images))]
    if r.unreadable:
        out["unreadable"] = [images[i] for i in r.unreadable]
    return out


def run_nlvr2(args, device: str) -> dict:
    if args.inputs:
        rows = read_lines(args.inputs, 3)
    elif args.left and args.right and args.statement:
        rows = [[args.left, args.right, args.statement]]
    else:
        raise UserError("--task nlvr2 needs --left, --right and --statement, or --inputs")
    judge = NLVR2Judge.from_pretrained(args.checkpoint, device=device)
    if not args.inputs:
        j = judge.judge(*rows[0])
        return {"value": j.value, "score": j.score}
    results = []
    for a in batches(len(rows), args.batch_size, True):
        part = rows[a : a + args.batch_size]
        got = judge.judge_batch([r[0] for r in part], [r[1] for r in part], [r[2] for r in part])
        for (left, right, s), j in zip(part, got):
            r = {"left": left, "right": right, "statement": s}
            r.update(
                {"error": f"cannot read image {left} or {right}"}
                if j is None
                else {"value": j.value, "score": j.score}
            )
            results.append(r)
    return {"results": results}


def print_table(task: str, out: dict, top_k: int) -> None:
    if task == "retrieval":
        for i, row in enumerate(out["image_to_text"]):
            print(f"{out['images'][i]}")
            for t in row[:top_k]:
                print(f"    {out['texts'][t]}")
        for t, row in enumerate(out["text_to_image"]):
            print(f"{out['texts'][t]!r}: " + ", ".join(out["images"][i] for i in row[:top_k]))
        for name in out.get("unreadable", []):
            print(f"{name}: cannot read this image")
        return
    for r in out.get("results", [out]):
        head = " | ".join(str(r[k]) for k in ("image", "question", "left", "right", "statement") if k in r)
        if "error" in r:
            print(f"{head}: {r['error']}")
        elif "answers" in r:
            print(head)
            for a in r["answers"]:
                print(f"    {a['score']:6.3f}  {a['answer']}")
        else:
            print(f"{head}{': ' if head else ''}{r['value']} ({r['score']:.3f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = {"vqa": run_vqa, "retrieval": run_retrieval, "nlvr2": run_nlvr2}[args.task]
    try:
        out = run(args, resolve_device(args.device))
    except (UserError, UnreadableImageError, MissingHeadError, FileNotFoundError, ValueError) as e:
        print(f"eve-predict: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print_table(args.task, out, args.top_k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
