"""What a trained EVE looks at: Grad-CAM on the shared attention, and how tokens spread over experts.

Grad-CAM follows ALBEF's visualisation of ViT-style attention: at one chosen block (`layer`, default
`default_layer`: two thirds of the way up, ALBEF's layer 8 of 12), the attention probabilities A (B, H,
N, N) of the block's self-attention are kept with their gradient G = d score / d A, and the map is
mean over heads of A * max(G, 0), read at the cross-modal entries of A: text queries -> image patch
keys (VQA: the text [CLS] row, which the answer head reads; MLM: the [MASK] row), or image queries ->
text keys (MIM: per-word values, summed over the visible image tokens). EVE has one stream for both
modalities, so every block is cross-modal; the image [CLS] key is left out as ALBEF leaves it out.

The score is the chosen answer's logit (VQA), the true word's logit at the masked position (MLM), and
minus the pixel reconstruction error of the masked patches (MIM).

VQA's default is the mean of that map over all blocks (`layer` None): on the synthetic scenes it is the
most faithful of the per-block maps, the mean over the question's rows and the blocks' rollout (Chefer
et al. 2021, which the mean equals there, the products of maps being second order), measured by
`research/gradcam_box.py` (docs/inference.md).

The attention is recomputed explicitly (softmax(q k^T / sqrt(d) + bias) v) in the explained blocks only,
for the duration of one call: SDPA keeps no probabilities. The output is the same function.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from eve_ds.models.layers import Attention, Tokens


def default_layer(num_layers: int) -> int:
    return (2 * num_layers) // 3


def _explicit_attention(self: Attention, x: Tensor, tokens: Tokens) -> Tensor:
    """Attention.forward with the probabilities kept (self.kept_attn (B, H, N, N), grad retained)."""
    B, N, D = x.shape
    q, k, v = self.heads(x)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    bias = self.attn_bias(tokens, N, q.dtype)
    attn = (logits if bias is None else logits + bias).softmax(-1)
    if attn.requires_grad:
        attn.retain_grad()
    self.kept_attn = attn
    return self.proj((attn @ v).transpose(1, 2).reshape(B, N, D))


@contextlib.contextmanager
def keep_attention(encoder, layers: Sequence[int]) -> Iterator[list[Attention]]:
    """The attention of each block in `layers` computes explicitly and keeps its probabilities while
    open -> those Attention modules, in the order of `layers`."""
    blocks = len(encoder.blocks)
    bad = [i for i in layers if not 0 <= i < blocks]
    if bad or not layers:
        raise ValueError(f"layer {bad[0] if bad else layers!r}: the model has blocks 0 to {blocks - 1}")
    attns = [encoder.blocks[i].attn for i in layers]
    for attn in attns:
        attn.forward = types.MethodType(_explicit_attention, attn)
    try:
        yield attns
    finally:
        for attn in attns:
            if "forward" in vars(attn):
                del attn.forward  # back to the class's SDPA forward
            attn.kept_attn = None


def gradcam(attn: Tensor) -> Tensor:
    """(B, H, N, N) probabilities with .grad -> (B, N, N): mean over heads of A * max(dscore/dA, 0)."""
    return (attn * attn.grad.clamp(min=0)).mean(1)


@dataclass
class Heat:
    """heatmap: (G, G) over the patch grid (row-major as the patches); tokens / values: per-word values
    (MIM); score: the explained score; label: what was explained."""

    heatmap: Tensor | None
    label: str
    score: float
    tokens: list[str] | None = None
    values: list[float] | None = None


def vqa_heat(predictor, batch: dict, answer: int | None, layer: int | None = None) -> Heat:
    """Grad-CAM of one question (vqa_collate's batch of one) for answer index `answer` (default: the
    predicted one): text [CLS] query row -> patch keys, at block `layer`, or (None, the default) the
    mean over every block's map, which `research/gradcam_box.py` chose as the most faithful on scenes
    apart from those it reports."""
    model, grid = predictor.model, predictor.model.model_cfg.grid_size
    inputs = predictor.text_inputs(batch)
    layers = range(len(model.encoder.blocks)) if layer is None else [layer]
    with torch.enable_grad(), keep_attention(model.encoder, layers) as attns:
        enc = model.encoder(inputs["image"], inputs["text_ids"], inputs["text_mask"])
        logits = model.objectives["vqa"].head(enc.hidden[:, enc.n_image]).float()[0]  # (A,)
        a = int(logits.argmax()) if answer is None else answer
        model.zero_grad(set_to_none=True)
        logits[a].backward()
        rows = [gradcam(attn.kept_attn)[0, enc.n_image, 1 : enc.n_image] for attn in attns]  # each (P,)
    heat = torch.stack(rows).mean(0).reshape(grid, grid).detach().float().cpu()
    return Heat(heat, predictor.vocab.answer(a), float(logits[a].detach().sigmoid()))


def mlm_heat(predictor, batch: dict, position: int, target_id: int, layer: int) -> Heat:
    """Grad-CAM of the masked word at text `position` (batch of one, that token already [MASK]) for
    the true token `target_id`: the [MASK] query row -> patch keys."""
    model, grid = predictor.model, predictor.model.model_cfg.grid_size
    inputs = predictor.text_inputs(batch)
    with torch.enable_grad(), keep_attention(model.encoder, [layer]) as (attn,):
        enc = model.encoder(inputs["image"], inputs["text_ids"], inputs["text_mask"])
        logits = model.objectives["mlm"].head(enc.text[0, position][None]).float()[0]  # (V,)
        model.zero_grad(set_to_none=True)
        logits[target_id].backward()
        cam = gradcam(attn.kept_attn)[0]
    heat = cam[enc.n_image + position, 1 : enc.n_image].reshape(grid, grid).detach().float().cpu()
    word = predictor.ctx.tokenizer.convert_ids_to_tokens([target_id])[0]
    return Heat(heat, word, float(logits.detach().softmax(0)[target_id]))


def mim_heat(predictor, batch: dict, masked: Tensor, layer: int) -> Heat:
    """Per-word Grad-CAM of the reconstruction of the `masked` patches ((P,) bool; dropped before the
    encoder as in pre-training): visible image queries -> text keys, summed over the queries."""
    model = predictor.model
    if "mim_pixel" not in model.objectives:
        raise ValueError(
            f"{predictor.source}: no mim_pixel head (its heads: {', '.join(sorted(model.objectives))})"
        )
    mim = model.objectives["mim_pixel"]
    inputs = predictor.text_inputs(batch)
    keep = (~masked).nonzero().squeeze(1)[None].to(predictor.device)  # (1, n_keep)
    restore = torch.cat([keep[0], masked.nonzero().squeeze(1).to(keep.device)]).argsort()[None]
    with torch.enable_grad(), keep_attention(model.encoder, [layer]) as (attn,):
        enc = model.encoder(inputs["image"], inputs["text_ids"], inputs["text_mask"], keep_ids=keep)
        pred = mim.decoder(enc.image, restore).float()  # (1, P, p*p*C)
        target = mim.target({"pixels": batch["image"].to(predictor.device)})
        err = (pred - target).pow(2).mean(-1)[0, masked.to(pred.device)].mean()
        model.zero_grad(set_to_none=True)
        (-err).backward()
        cam = gradcam(attn.kept_attn)[0]  # (N, N)
    n_text = int(batch["text_mask"][0].sum())
    values = cam[: enc.n_image, enc.n_image : enc.n_image + n_text].sum(0).detach().float().cpu()
    tokens = predictor.ctx.tokenizer.convert_ids_to_tokens(batch["text_ids"][0, :n_text].tolist())
    # [CLS] and [SEP] are no words of the caption.
    return Heat(None, "masked patches", -float(err.detach()), tokens[1:-1], values[1:-1].tolist())


@torch.no_grad()
def routing_counts(model, batches, block: int | None = None) -> tuple[int, Tensor]:
    """Routes per expert of image (row 0) and text (row 1) tokens of one soft block summed over fused
    [image; text] passes of `batches` (dicts of model inputs) -> (block, (2, E) float32 counts), the
    counts the model's `expert_load/block*` outputs are normalised from."""
    soft = list(model.model_cfg.soft_blocks)
    block = soft[-1] if block is None else block
    if block not in soft:
        raise ValueError(f"block {block} is not a soft-router block (those are {soft})")
    total = None
    for inputs in batches:
        enc = model.encoder(inputs["image"], inputs["text_ids"], inputs["text_mask"])
        c = enc.expert_counts[block].float().cpu()
        total = c if total is None else total + c
    return block, total
