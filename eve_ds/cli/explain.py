"""`eve-explain`: PNG figures of what a trained EVE attends to, and how its tokens use the experts.

eve-explain --checkpoint DIR --task vqa --image IMG --question Q [--answer A] --out FILE.png [--json]
eve-explain --checkpoint DIR --task mlm --image IMG --text CAPTION --word WORD --out FILE.png
eve-explain --checkpoint DIR --task mim --image IMG --text CAPTION --box X0,Y0,X1,Y1 --out FILE.png
eve-explain --checkpoint DIR --task routing --inputs LIST.tsv [--block B] --out FILE.png

Grad-CAM (vqa, mlm, mim): mean over heads of attention x positive gradient, as ALBEF's visualisation
computes it, at block --layer (default: vqa the mean of the maps of all blocks, mlm / mim two thirds of
the way up; docs/inference.md). --json prints
{"heatmap": [[...]]} at the patch grid's resolution (mim: {"tokens", "values"}; routing: {"counts"}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

from eve_ds.cli.predict import UserError as ListError
from eve_ds.cli.predict import read_lines
from eve_ds.infer import MissingHeadError, Predictor, UnreadableImageError, VQAPredictor, figures
from eve_ds.infer import attribution as ex
from eve_ds.infer import preprocess as pre
from eve_ds.train.distributed import resolve_device


class UserError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-explain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", required=True, choices=["vqa", "mlm", "mim", "routing"])
    p.add_argument("--image")
    p.add_argument("--question", help="vqa")
    p.add_argument("--answer", help="vqa: the answer to explain (default: the predicted one)")
    p.add_argument("--text", help="mlm / mim: the caption")
    p.add_argument("--word", help="mlm: the word of --text to mask and explain")
    p.add_argument("--box", help="mim: the patches to mask, as a pixel box x0,y0,x1,y1 of the model's input")
    p.add_argument("--inputs", help="routing: tab-separated lines image<TAB>text")
    p.add_argument("--block", type=int, default=None, help="routing: a soft block (default: the last)")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="Grad-CAM block (default: vqa the mean over all blocks, mlm/mim 2/3 of the depth)",
    )
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def need(args, *names: str) -> None:
    missing = [f"--{n}" for n in names if not getattr(args, n)]
    if missing:
        raise UserError(f"--task {args.task} needs {' and '.join(missing)}")


def open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception:  # any reason the file is no usable image
        raise UnreadableImageError([path]) from None


def explain_vqa(args, device: str) -> dict:
    need(args, "image", "question")
    p = VQAPredictor.from_pretrained(args.checkpoint, device=device)
    batch, bad = pre.vqa_batch([args.image], [args.question], p.vocab, p.ctx, p.geometry)
    if bad:
        raise UnreadableImageError([args.image])
    answer = None
    if args.answer:
        answer = p.vocab.index(args.answer)
        if answer is None:
            raise UserError(f"--answer {args.answer!r} is not in the model's {len(p.vocab)} answers")
    heat = ex.vqa_heat(p, batch, answer, args.layer)
    where = "mean over blocks" if args.layer is None else f"block {args.layer}"
    title = f"Q: {args.question}  A: {heat.label} ({heat.score:.2f}), {where}"
    figures.heatmap_figure(open_image(args.image), heat.heatmap, title, args.out, p.geometry)
    return {"heatmap": heat.heatmap.tolist(), "answer": heat.label, "score": heat.score, "layer": where}


def masked_word(p: Predictor, batch: dict, word: str) -> tuple[int, int]:
    """Replace the first token of `word` in the caption by [MASK] -> (text position, true token id)."""
    ids = p.ctx.tokenizer(word, add_special_tokens=False)["input_ids"]
    row = batch["text_ids"][0].tolist()
    pos = next((i for i in range(len(row)) if ids and row[i : i + 1] == ids[:1]), None)
    if pos is None:
        raise UserError(f"--word {word!r} is not in --text")
    batch["text_ids"][0, pos] = p.model.obj_cfg.mask_token_id
    return pos, ids[0]


def explain_mlm(args, device: str) -> dict:
    need(args, "image", "text", "word")
    p = Predictor.from_pretrained(args.checkpoint, device=device)
    if "mlm" not in p.model.objectives:
        raise MissingHeadError(
            f"{args.checkpoint}: no mlm head (its heads: {', '.join(sorted(p.model.objectives))})"
        )
    batch = pre.pair_batch(args.image, args.text, p.ctx, p.geometry)
    pos, target = masked_word(p, batch, args.word)
    layer = ex.default_layer(len(p.model.encoder.blocks)) if args.layer is None else args.layer
    heat = ex.mlm_heat(p, batch, pos, target, layer)
    title = f"{args.text}  [MASK]={heat.label} (p={heat.score:.2f}), block {layer}"
    figures.heatmap_figure(open_image(args.image), heat.heatmap, title, args.out, p.geometry)
    return {"heatmap": heat.heatmap.tolist(), "word": heat.label, "score": heat.score, "layer": layer}


def box_mask(box: str, image_size: int, patch: int) -> np.ndarray:
    """(G, G) bool: the patches that overlap the pixel box x0,y0,x1,y1 of the S x S model input."""
    try:
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise UserError(f"--box {box!r}: expected x0,y0,x1,y1 in pixels") from None
    g = image_size // patch
    cols, rows = np.arange(g) * patch, np.arange(g) * patch
    m = ((rows[:, None] + patch > y0) & (rows[:, None] < y1)) & (
        (cols[None] + patch > x0) & (cols[None] < x1)
    )
    if not m.any() or m.all():
        raise UserError(f"--box {box!r} must cover some but not all of the {image_size} px input")
    return m


def explain_mim(args, device: str) -> dict:
    need(args, "image", "text", "box")
    p = Predictor.from_pretrained(args.checkpoint, device=device)
    cfg = p.model.model_cfg
    grid_mask = box_mask(args.box, cfg.image_size, cfg.patch_size)
    batch = pre.pair_batch(args.image, args.text, p.ctx, p.geometry)
    layer = ex.default_layer(len(p.model.encoder.blocks)) if args.layer is None else args.layer
    heat = ex.mim_heat(p, batch, torch.from_numpy(grid_mask.reshape(-1)), layer)
    title = f"masked patches: per-word Grad-CAM, block {layer}"
    figures.word_bars_figure(
        open_image(args.image), grid_mask, heat.tokens, heat.values, title, args.out, p.geometry
    )
    return {"tokens": heat.tokens, "values": heat.values, "layer": layer}


def explain_routing(args, device: str) -> dict:
    need(args, "inputs")
    try:
        rows = read_lines(args.inputs, 2)
    except ListError as e:
        raise UserError(str(e)) from None
    p = Predictor.from_pretrained(args.checkpoint, device=device)
    batches = (p.text_inputs(pre.pair_batch(image, text, p.ctx, p.geometry)) for image, text in rows)
    block, counts = ex.routing_counts(p.model, batches, args.block)
    figures.routing_figure(counts, block, args.out)
    return {"block": block, "counts": counts.tolist(), "modalities": ["image", "text"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = {"vqa": explain_vqa, "mlm": explain_mlm, "mim": explain_mim, "routing": explain_routing}[args.task]
    try:
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        out = run(args, resolve_device(args.device))
    except (UserError, UnreadableImageError, MissingHeadError, FileNotFoundError, ValueError) as e:
        print(f"eve-explain: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
