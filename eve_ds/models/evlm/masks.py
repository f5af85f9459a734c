"""Which image slots each token reads, as one interval per token, for images, interleaved text and video.

Every query attends to the slots [lo, hi] of its row, plus the null key; lo = hi = -1 means the null key
only. The rules (EVLM Sec. 2.1, with frame-aware video masks for SFT):
- the media tokens of slot m see [m, m] (a video frame is a slot of its own);
- text sees the most recent preceding image of the same packed document, or all frames of that clip when
  it is a video; text before any image of its document sees nothing (-1);
- padding sees nothing.

`layout_row` / `stack_rows` turn documents of segments into these tensors (plus position ids restarting
per document, which is what isolates packed documents in the LM's self-attention); the data pipeline's
collate function is expected to produce the same fields.
"""

from __future__ import annotations

import torch
from torch import Tensor

TEXT, MEDIA, PAD = 0, 1, 2
SEGMENT_KINDS = ("text", "image", "video")


def slot_ranges(clip_of_slot: Tensor) -> tuple[Tensor, Tensor]:
    """clip_of_slot: (B, M), the clip id of each slot (-1: a still image or an unused slot) ->
    first and last slot (B, M) of the clip each slot belongs to (the slot itself for stills)."""
    B, M = clip_of_slot.shape
    slots = torch.arange(M, device=clip_of_slot.device).expand(B, M)
    same = (clip_of_slot[:, :, None] == clip_of_slot[:, None, :]) & (clip_of_slot[:, :, None] >= 0)
    same = same | torch.eye(M, dtype=torch.bool, device=same.device)
    first = torch.where(same, slots[:, None, :], M).amin(-1)
    last = torch.where(same, slots[:, None, :], -1).amax(-1)
    return first, last


def media_intervals(
    token_kind: Tensor, sample_id: Tensor, media_slot: Tensor, clip_of_slot: Tensor
) -> tuple[Tensor, Tensor]:
    """token_kind, sample_id, media_slot: (B, S) (slot of each media token, ignored elsewhere);
    clip_of_slot: (B, M) -> lo, hi: (B, S) long."""
    B, S = token_kind.shape
    M = clip_of_slot.shape[1]
    is_media = token_kind == MEDIA
    bad = media_slot[is_media]
    if bad.numel() and (bad.min() < 0 or bad.max() >= M):
        raise ValueError(f"media_slot values {sorted(set(bad.tolist()))} outside the {M} slots of the batch")
    pos = torch.arange(S, device=token_kind.device).expand(B, S)
    last = torch.where(is_media, pos, -1).cummax(dim=1).values  # (B, S) last media position so far
    at = last.clamp(min=0)
    slot = torch.where(is_media, media_slot, 0).gather(1, at)
    seen = (last >= 0) & (sample_id.gather(1, at) == sample_id)
    first, final = slot_ranges(clip_of_slot)
    lo, hi = first.gather(1, slot), final.gather(1, slot)
    lo = torch.where(is_media, media_slot, lo)  # a frame's own tokens see only that frame
    hi = torch.where(is_media, media_slot, hi)
    keep = (seen | is_media) & (token_kind != PAD)
    return torch.where(keep, lo, -1), torch.where(keep, hi, -1)


def _segment(seg: dict, media_id: int, num_media_tokens: int) -> tuple[list[int], list[int], int]:
    """One segment -> (token ids, loss flags, number of slots it fills)."""
    kinds = [k for k in SEGMENT_KINDS if k in seg]
    if len(kinds) != 1:
        raise ValueError(f"segment {seg!r}: unknown segment kind, expected exactly one of {SEGMENT_KINDS}")
    if kinds[0] == "text":
        ids = list(seg["text"])
        return ids, [int(seg.get("loss", True))] * len(ids), 0
    frames = 1 if kinds[0] == "image" else int(seg["video"])
    if frames < 1:
        raise ValueError(f"segment {seg!r}: a video needs >= 1 frame, got {frames}")
    n = frames * num_media_tokens
    return [media_id] * n, [0] * n, frames


def layout_row(docs: list[list[dict]], media_id: int, num_media_tokens: int) -> dict[str, Tensor]:
    """Documents packed into one row. A segment is {"text": ids, "loss": bool}, {"image": ...} or
    {"video": n_frames}. -> input_ids, labels (-100 off the loss), position_ids (restarting per
    document), token_kind, sample_id, media_slot: (S,); clip_of_slot: (M,)."""
    cols: dict[str, list[int]] = {
        k: [] for k in ("input_ids", "labels", "position_ids", "kind", "sample", "slot")
    }
    clips: list[int] = []  # clip id of each slot, -1 for stills
    videos = 0
    for d, doc in enumerate(docs):
        start = len(cols["input_ids"])
        for seg in doc:
            ids, loss, frames = _segment(seg, media_id, num_media_tokens)
            slots = (
                [len(clips) + i // num_media_tokens for i in range(len(ids))] if frames else [-1] * len(ids)
            )
            clips += [videos if "video" in seg else -1] * frames
            videos += "video" in seg
            cols["input_ids"] += ids
            cols["labels"] += [t if f else -100 for t, f in zip(ids, loss)]
            cols["kind"] += [MEDIA if frames else TEXT] * len(ids)
            cols["slot"] += slots
            cols["sample"] += [d] * len(ids)
        cols["position_ids"] += range(len(cols["input_ids"]) - start)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()}
    out["token_kind"], out["sample_id"], out["media_slot"] = (
        out.pop("kind"),
        out.pop("sample"),
        out.pop("slot"),
    )
    out["clip_of_slot"] = torch.tensor(clips, dtype=torch.long)
    return out


def stack_rows(rows: list[dict[str, Tensor]], pad_id: int, left: bool = False) -> dict[str, Tensor]:
    """Rows of `layout_row` -> a batch padded at the end: the (B, S) fields, clip_of_slot (B, M), lo / hi
    (B, S) and valid (B, S) bool. Padding is its own document (positions from 0), kind PAD, labels -100.

    left=True pads at the start instead, for prompts of several lengths decoded together
    (`EVLMModel.generate_greedy`), and adds `attention_mask` (B, S) = valid as int64: the padding must be
    masked out explicitly there (a KV cache turns off the packed-document masks)."""
    S = max(len(r["input_ids"]) for r in rows)
    M = max(1, max(len(r["clip_of_slot"]) for r in rows))

    def pad(t: Tensor, value: int) -> Tensor:
        fill = t.new_full((S - len(t),), value)
        return torch.cat([fill, t] if left else [t, fill])

    fill = {"input_ids": pad_id, "labels": -100, "token_kind": PAD, "sample_id": -1, "media_slot": -1}
    batch: dict[str, Tensor] = {
        key: torch.stack([pad(r[key], value) for r in rows]) for key, value in fill.items()
    }
    batch["position_ids"] = torch.stack(
        [
            torch.cat([torch.zeros(S - len(r["position_ids"]), dtype=torch.long), r["position_ids"]])
            if left
            else torch.cat([r["position_ids"], torch.arange(S - len(r["position_ids"]))])
            for r in rows
        ]
    )
    clips = [r["clip_of_slot"] for r in rows]
    batch["clip_of_slot"] = torch.stack([torch.cat([c, c.new_full((M - len(c),), -1)]) for c in clips])
    batch["lo"], batch["hi"] = media_intervals(
        batch["token_kind"], batch["sample_id"], batch["media_slot"], batch["clip_of_slot"]
    )
    batch["valid"] = batch["token_kind"] != PAD
    if left:
        batch["attention_mask"] = batch["valid"].long()
    return batch
