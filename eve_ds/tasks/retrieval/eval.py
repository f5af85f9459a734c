"""Image-text retrieval metric (recall@K) and ALBEF / BEiT-3's two-stage re-ranking.

Text retrieval (TR@K): the fraction of images for which at least one of their captions is among the K
best-scored texts. Image retrieval (IR@K): the fraction of captions whose image is among the K best-scored
images. Reported in percent, with r_mean the mean of the six numbers, as in ALBEF / BEiT-3 / EVE.

Ties. ALBEF takes ranks from `argsort`, which orders equal scores arbitrarily. Here the rank of a
candidate is the number of candidates with a STRICTLY higher score, so a ground truth tied with others
gets the best of the tied places. This is deterministic, independent of the order of the candidates, and
matters for re-ranked matrices: every candidate outside the top k holds the same low score, so a ground
truth outside the top k ranks exactly k -- recall@K for K <= k is what an exact ranking would give.

Re-ranking: ITC similarities of all pairs pick each image's top-k texts and each text's top-k images,
which the ITM head then scores (the expensive fusion passes); everything else gets `LOW_SCORE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# The score of a pair that was not re-ranked: below any ITM (+ ITC) score, finite in float32.
LOW_SCORE = -1.0e9
_RANK_CHUNK = 1024  # rows compared at once: bounds the (rows, candidates) boolean temporary


def _count_higher(scores: Tensor, threshold: Tensor) -> Tensor:
    """scores: (R, C), threshold: (R,) -> (R,) int64 number of entries of each row strictly above it."""
    parts = [
        (scores[a : a + _RANK_CHUNK] > threshold[a : a + _RANK_CHUNK, None]).sum(1)
        for a in range(0, scores.shape[0], _RANK_CHUNK)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=scores.device)


def _check_scores(scores_i2t: Tensor, scores_t2i: Tensor, text_to_image: Tensor) -> None:
    n_img, n_txt = scores_i2t.shape
    if n_img == 0:
        raise ValueError("no images to rank")
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {tuple(scores_t2i.shape)}, expected ({n_txt}, {n_img})")
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image has {text_to_image.numel()} entries, scores have {n_txt} texts")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image holds image indices outside [0, {n_img})")
    if torch.bincount(text_to_image, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one text in text_to_image")
    if scores_i2t.isnan().any() or scores_t2i.isnan().any():
        raise ValueError("the score matrices hold NaN")


def recall_at_k(
    scores_i2t: Tensor,
    text_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    scores_t2i: Tensor | None = None,
) -> dict[str, float]:
    """scores_i2t: (N_img, N_txt) used for TR; scores_t2i: (N_txt, N_img) for IR (default scores_i2t.T);
    text_to_image: (N_txt,) the image of each text. -> {"tr_r1", ..., "ir_r1", ..., "r_mean"} in percent.
    """
    scores_t2i = scores_i2t.t() if scores_t2i is None else scores_t2i
    t2i = torch.as_tensor(text_to_image, dtype=torch.int64, device=scores_i2t.device)
    _check_scores(scores_i2t, scores_t2i, t2i)
    n_img, n_txt = scores_i2t.shape
    # TR: the best-ranked caption of an image is its highest-scored one.
    own = scores_i2t[t2i, torch.arange(n_txt, device=t2i.device)]  # (N_txt,) score of (its image, text)
    best = torch.full((n_img,), -math.inf, dtype=own.dtype, device=own.device)
    best = best.scatter_reduce(0, t2i, own, reduce="amax")
    tr_rank = _count_higher(scores_i2t, best)  # (N_img,)
    ir_rank = _count_higher(scores_t2i, scores_t2i[torch.arange(n_txt, device=t2i.device), t2i])  # (N_txt,)
    out = {}
    for prefix, rank in (("tr", tr_rank), ("ir", ir_rank)):
        for k in ks:
            out[f"{prefix}_r{k}"] = 100.0 * (rank < k).double().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def row_block(n: int, rank: int, world_size: int) -> range:
    """The contiguous rows [start, stop) of `n` that `rank` of `world_size` re-ranks (ALBEF's split)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    step = math.ceil(n / world_size)
    start = min(rank * step, n)
    return range(start, min(start + step, n))


def _rerank_rows(
    scores: Tensor,
    k: int,
    score_fn: Callable[[Tensor, Tensor], Tensor],
    rows: range,
    chunk_size: int,
    itc_weight: float,
) -> Tensor:
    """scores: (R, C) first-stage scores -> (R, C) float32: for each row of `rows`, its top-k columns
    re-scored by score_fn(row_indices (P,), col_indices (P,)) -> (P,) (+ itc_weight * first-stage score),
    called on at most `chunk_size` pairs at a time; every other entry LOW_SCORE."""
    out = torch.full(scores.shape, LOW_SCORE, dtype=torch.float32, device=scores.device)
    if len(rows) == 0 or scores.shape[1] == 0:
        return out
    kk = min(k, scores.shape[1])
    top = scores[rows.start : rows.stop].topk(kk, dim=1).indices  # (r, kk)
    row_idx = torch.arange(rows.start, rows.stop, device=scores.device).repeat_interleave(kk)  # (r * kk,)
    col_idx = top.reshape(-1)
    values = []
    for a in range(0, row_idx.numel(), chunk_size):
        r, c = row_idx[a : a + chunk_size], col_idx[a : a + chunk_size]
        v = score_fn(r, c).reshape(-1)
        if v.numel() != r.numel():
            raise ValueError(f"itm_score_fn returned {v.numel()} scores for {r.numel()} pairs")
        values.append(v.float().to(scores.device))
    values = torch.cat(values)
    if not values.isfinite().all():
        raise ValueError("itm_score_fn returned a non-finite score")
    if itc_weight:
        values = values + itc_weight * scores[row_idx, col_idx].float()
    out[row_idx, col_idx] = values
    return out


def rerank(
    itc_scores: Tensor,
    k: int,
    itm_score_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int = 256,
    itc_weight: float = 0.0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """itc_scores: (N_img, N_txt) -> (scores_i2t (N_img, N_txt), scores_t2i (N_txt, N_img)), float32.

    Each image's top-k texts and each text's top-k images by ITC are scored by
    itm_score_fn(image_indices (P,), text_indices (P,)) -> (P,) plus itc_weight times their ITC score
    (ALBEF adds it: itc_weight=1; 0 ranks by ITM alone); all other entries are LOW_SCORE. Only the image
    rows and text rows of `row_block(.., rank, world_size)` are computed, the rest left at LOW_SCORE, so
    an elementwise max over ranks (`combine_partial`, or dist.all_reduce with ReduceOp.MAX) gives the full
    matrices. Among ITC scores tied at the k-th place, topk keeps an arbitrary (but fixed) subset.
    """
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k={k} and chunk_size={chunk_size} must be at least 1")
    n_img, n_txt = itc_scores.shape
    i2t = _rerank_rows(
        itc_scores, k, itm_score_fn, row_block(n_img, rank, world_size), chunk_size, itc_weight
    )
    t2i = _rerank_rows(
        itc_scores.t(),
        k,
        lambda texts, images: itm_score_fn(images, texts),
        row_block(n_txt, rank, world_size),
        chunk_size,
        itc_weight,
    )
    return i2t, t2i


def combine_partial(parts: Sequence[Tensor]) -> Tensor:
    """The full re-ranked matrix from the partial ones of every rank: their elementwise maximum (a row
    computed by one rank is LOW_SCORE everywhere else). What dist.all_reduce(x, ReduceOp.MAX) does."""
    out = parts[0].clone()
    for p in parts[1:]:
        torch.maximum(out, p, out=out)
    return out
