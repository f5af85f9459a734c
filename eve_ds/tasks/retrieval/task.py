"""Image-text retrieval (COCO / Flickr30K, Karpathy splits) as a task of the shared trainer: the files
(`data`), recall@K and re-ranking (`eval`), and the `itc` + `itm` objectives of
`eve_ds/objectives/contrastive.py` (image-id aware: all captions of an image are its positives).

Evaluation, as ALBEF / BEiT-3 / EVE do it:
1. every image and every caption is embedded once (image-only / text-only passes and the ITC projections),
   each rank taking a `rank_slice`, the features gathered;
2. the ITC similarity of all pairs gives the `itc_*` recalls;
3. each image's top-k captions and each caption's top-k images (k = task.rerank_k) are re-scored by the
   ITM head in fusion passes; the rows are split over ranks in contiguous blocks (`row_block`) and the
   partial score matrices combined with an all-reduce MAX;
4. the re-ranked scores give `tr_r1` ... `r_mean`.

Bad input: a training image that is missing is skipped at read time and one that cannot be decoded by the
collate (both counted); an evaluation image either way is an error unless `task.skip_bad_eval_images`
(then it is dropped with its captions and `num_skipped_images` says how many).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from eve_ds.tasks.base import Task, TaskContext, register_task
from eve_ds.tasks.retrieval.data import (
    RetrievalDataError,
    RetrievalImage,
    RetrievalImageDataset,
    RetrievalTrainDataset,
    read_karpathy,
    retrieval_image_collate,
    retrieval_train_collate,
    texts_of,
)
from eve_ds.tasks.retrieval.eval import recall_at_k, rerank, row_block
from eve_ds.tasks.retrieval.synthetic import ensure_synthetic_retrieval
from eve_ds.utils.image import normalize_image
from eve_ds.utils.io import atomic_write_json
from eve_ds.utils.ranks import gather_objects, rank_and_world, rank_slice

log = logging.getLogger(__name__)


@register_task("retrieval")
class RetrievalTask(Task):
    objectives = ("itc", "itm")
    metric = "r_mean"
    official_text = ("caption", 30, 30)  # [official code] pre_caption, max words

    def make_synthetic(
        self, cache_dir: str, *, seed: int, counts: tuple[int, int, int], image_size: int
    ) -> str:
        num_train, num_val, num_test = counts
        return ensure_synthetic_retrieval(
            cache_dir,
            seed=seed,
            dataset=self.cfg.dataset,
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            image_size=image_size,
        )

    def prepare(self) -> None:
        """Read train + restval; images whose file is missing are skipped and counted."""
        root = self.root()
        self.train_images, self.counts = read_karpathy(root, self.cfg.dataset, "train")
        if not self.train_images:
            raise RetrievalDataError(
                f"{root}: no training image of {self.cfg.dataset} is usable ({self.counts})"
            )
        log.info("%s retrieval from %s: training on %s", self.cfg.dataset, root, self.counts)

    def train_dataset(self):
        ds = RetrievalTrainDataset(
            self.train_images,
            self.ctx.image_size,
            **self.train_image_options(),
        )
        return ds, functools.partial(
            retrieval_train_collate, tokenizer=self.tokenizer(train=True), max_text_len=self.ctx.max_text_len
        )

    def read(self, split: str) -> list[RetrievalImage]:
        skip = self.cfg.skip_bad_eval_images
        return read_karpathy(self.root(), self.cfg.dataset, split, skip_bad_test_images=skip)[0]

    def score(
        self,
        model,
        split: str,
        *,
        device: str,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        predictions: str | None = None,
    ) -> dict:
        """Recall@1/5/10 of `split` (ITC-only as itc_*, re-ranked), sizes, seconds; with `predictions`,
        each query's top 10 written there (`write_rankings`)."""
        start = time.perf_counter()
        if self.cfg.rerank_k < 10:
            log.warning(
                "task.rerank_k=%d < 10: a ground truth outside the top k ranks k, so the re-ranked R@K for "
                "K > k overstates the recall",
                self.cfg.rerank_k,
            )
        images = self.read(split)
        if not images:
            raise RetrievalDataError(
                f"{self.root()}: the {self.cfg.dataset} {split} split has no image to evaluate"
            )
        scores = retrieval_scores(
            model,
            images,
            self.eval_context(),
            k=self.cfg.rerank_k,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            skip_bad=self.cfg.skip_bad_eval_images,
            geometry=self.cfg.image_geometry,
        )
        metrics = scores.metrics()
        if predictions and rank_and_world()[0] == 0:
            write_rankings(predictions, scores)
            metrics["predictions"] = os.path.abspath(predictions)
        metrics["eval_seconds"] = time.perf_counter() - start
        return metrics


@dataclass
class RetrievalScores:
    """The score matrices of one evaluation: itc (N_img, N_txt) all pairs; i2t (N_img, N_txt) and t2i
    (N_txt, N_img) re-ranked (objective.itm_rerank_score of each row's top k, LOW_SCORE elsewhere);
    text_to_image (N_txt,); the images evaluated and how many were skipped as unreadable."""

    itc: Tensor
    i2t: Tensor
    t2i: Tensor
    text_to_image: list[int]
    images: list[RetrievalImage]
    num_skipped_images: int = 0

    def metrics(self) -> dict:
        itc = recall_at_k(self.itc, self.text_to_image)
        out = {
            "num_images": len(self.images),
            "num_texts": len(self.text_to_image),
            **recall_at_k(self.i2t, self.text_to_image, scores_t2i=self.t2i),
            **{f"itc_{k}": v for k, v in itc.items()},
        }
        if self.num_skipped_images:
            out["num_skipped_images"] = self.num_skipped_images
        return out


@torch.no_grad()
def retrieval_scores(
    model,
    images: list[RetrievalImage],
    ctx: TaskContext,
    *,
    k: int,
    device: str,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
    skip_bad: bool = False,
    geometry: str = "square_crop",
) -> RetrievalScores:
    """ITC scores of every (image, caption) pair and the ITM re-ranking of each row's top k, on every rank
    (all ranks must call it: the features and the partial matrices are gathered); images read with
    task.image_geometry `geometry`."""
    was_training = model.training
    model.eval()
    try:
        ev = _Evaluator(model, ctx, device, dtype, batch_size, geometry)
        img_feats, bad = ev.embed_images(images, skip_bad)
        if bad:
            log.warning("%d unreadable evaluation image(s) skipped with their captions", len(bad))
            keep = sorted(set(range(len(images))) - set(bad))
            images, img_feats = [images[i] for i in keep], img_feats[keep]
        texts, text_to_image = texts_of(images)
        tokens = ctx.tokenizer(
            texts, max_length=ctx.max_text_len, truncation=True, padding="max_length", return_tensors="pt"
        )
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        txt_feats = ev.embed_texts(ids, mask)
        itc = img_feats @ txt_feats.t()  # (N_img, N_txt) cosine similarities
        i2t, t2i = ev.rerank(images, ids, mask, itc, k)
    finally:
        model.train(was_training)
    return RetrievalScores(itc.cpu(), i2t.cpu(), t2i.cpu(), text_to_image, images, len(bad))


def write_rankings(path: str, scores: RetrievalScores, top: int = 10) -> None:
    """JSON: for each image (by id) the caption positions of its `top` best re-ranked captions, and for
    each caption the ids of its `top` best images, next to the captions and their image ids."""
    texts = [c for im in scores.images for c in im.captions]
    ids = [im.image_id for im in scores.images]
    tt = min(top, scores.i2t.shape[1])
    ti = min(top, scores.t2i.shape[1])
    atomic_write_json(
        path,
        {
            "captions": texts,
            "caption_image_ids": [ids[i] for i in scores.text_to_image],
            "text_retrieval": {str(i): r for i, r in zip(ids, scores.i2t.topk(tt, 1).indices.tolist())},
            "image_retrieval": [[ids[j] for j in r] for r in scores.t2i.topk(ti, 1).indices.tolist()],
        },
    )


class _EvalImages(Dataset):
    """Items {"image": (S, S, 3) uint8 or None when unreadable and skipped, "index"} of `indices`."""

    def __init__(
        self, images: list[RetrievalImage], image_size: int, indices: list[int], skip_bad: bool, geometry: str
    ):
        self.base = RetrievalImageDataset(images, image_size, geometry)
        self.indices, self.skip_bad = indices, skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        try:
            return self.base[self.indices[j]]
        except RetrievalDataError as e:
            if not self.skip_bad:
                raise
            log.warning("%s", e)
            return {"image": None, "index": self.indices[j]}


def _image_batch(items: list[dict]) -> tuple[dict | None, list[int]]:
    """(retrieval_image_collate of the readable items or None, the indices of the unreadable ones)."""
    kept = [x for x in items if x["image"] is not None]
    return (retrieval_image_collate(kept) if kept else None), [
        x["index"] for x in items if x["image"] is None
    ]


class _Evaluator:
    """The passes of one evaluation on this rank. Every encoder pass is counted: with experts sharded
    over ranks (model.ep_size > 1) each pass is collective (DeepSpeed's all-to-all), so a rank with fewer
    passes to make runs empty ones until every rank has made as many (`_even_out`)."""

    def __init__(
        self, model, ctx: TaskContext, device: str, dtype: torch.dtype, batch_size: int, geometry: str
    ) -> None:
        self.encoder, self.ctx, self.device, self.dtype, self.batch_size = (
            model.encoder,
            ctx,
            device,
            dtype,
            batch_size,
        )
        self.geometry = geometry
        self.itc, self.itm = model.objectives["itc"], model.objectives["itm"]
        self.rank, self.world = rank_and_world()
        self.collective_passes = self.world > 1 and model.model_cfg.ep_size > 1

    def _loader(self, dataset: Dataset, collate: Callable) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, collate_fn=collate, num_workers=self.ctx.num_workers
        )

    def _pixels(self, image: Tensor) -> Tensor:
        return normalize_image(image.to(self.device), self.dtype, self.ctx.image_mean, self.ctx.image_std)

    def embed_images(self, images: list[RetrievalImage], skip_bad: bool) -> tuple[Tensor, list[int]]:
        """-> (features (N_img, E) float32 on the device, every rank's; sorted unreadable indices)."""
        mine = list(rank_slice(len(images)))
        rows, feats, bad, passes = [], [], [], 0
        for batch, unreadable in self._loader(
            _EvalImages(images, self.ctx.image_size, mine, skip_bad, self.geometry), _image_batch
        ):
            bad += unreadable
            if batch is not None:
                feats.append(self.itc.embed_image(self.encoder, self._pixels(batch["image"]))[0])
                rows.append(batch["index"])
                passes += 1
        self._even_out(passes, lambda: self.itc.embed_image(self.encoder, self._blank_image()))
        return self._assemble(len(images), rows, feats, bad)

    def embed_texts(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (N_txt, L) -> features (N_txt, E) float32 on the device, every rank's."""
        mine = torch.tensor(list(rank_slice(ids.shape[0])), dtype=torch.int64)
        rows, feats = [], []
        for part in mine.split(self.batch_size):
            p = part.to(ids.device)
            feats.append(self.itc.embed_text(self.encoder, ids[p], mask[p])[0])
            rows.append(part)
        self._even_out(len(feats), lambda: self.itc.embed_text(self.encoder, ids[:1], mask[:1]))
        return self._assemble(ids.shape[0], rows, feats, [])[0]

    def _assemble(self, n: int, rows: list[Tensor], feats: list[Tensor], bad: list[int]):
        """Every rank's (rows, features, unreadable) -> ((n, E) features in row order, sorted bad)."""
        mine = (
            torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64),
            torch.cat(feats).cpu() if feats else torch.zeros(0, self.itc.image_proj.out_features),
            bad,
        )
        out = torch.zeros(n, self.itc.image_proj.out_features)
        all_bad: list[int] = []
        for r, f, b in gather_objects(mine):
            out[r] = f.float()
            all_bad += b
        return out.to(self.device), sorted(set(all_bad))

    def rerank(self, images, ids: Tensor, mask: Tensor, itc: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This rank's rows of the re-ranked matrices, then every rank's: (i2t (N_img, N_txt), t2i)."""
        store = _PixelStore(images, self.ctx, self._needed(itc, k), self.geometry)
        passes = 0

        def itm(img_idx: Tensor, txt_idx: Tensor) -> Tensor:  # (P,), (P,) -> (P,) ITM re-ranking scores
            nonlocal passes
            passes += 1
            image = self._pixels(store.get(img_idx.tolist()))
            t = txt_idx.to(ids.device)
            return self.itm.match_score(self.encoder, image, ids[t], mask[t])

        i2t, t2i = rerank(itc, k, itm, chunk_size=self.batch_size, rank=self.rank, world_size=self.world)
        self._even_out(
            passes, lambda: self.itm.match_score(self.encoder, self._blank_image(), ids[:1], mask[:1])
        )
        if self.world > 1:  # a row that another rank computed is LOW_SCORE here: the max is its value
            dist.all_reduce(i2t, op=dist.ReduceOp.MAX)
            dist.all_reduce(t2i, op=dist.ReduceOp.MAX)
        return i2t, t2i

    def _needed(self, itc: Tensor, k: int) -> list[int]:
        """The images this rank's re-ranking reads: its block of image rows and its texts' top-k images."""
        rows = row_block(itc.shape[0], self.rank, self.world)
        texts = row_block(itc.shape[1], self.rank, self.world)
        top = itc[:, texts.start : texts.stop].t().topk(min(k, itc.shape[0]), dim=1).indices
        return sorted(set(rows) | set(top.unique().tolist()))

    def _blank_image(self) -> Tensor:
        s = self.ctx.image_size
        return torch.zeros(1, 3, s, s, dtype=self.dtype, device=self.device)

    def _even_out(self, passes: int, empty_pass: Callable) -> None:
        if not self.collective_passes:
            return
        most = torch.tensor([passes], dtype=torch.int64, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for _ in range(int(most) - passes):
            empty_pass()


class _PixelStore:
    """uint8 images (3, S, S) kept on the CPU for the fusion passes: those `needed` loaded up front by the
    DataLoader's workers, any other one when first asked for (5k COCO test images at 384 px: 2.2 GB)."""

    def __init__(
        self, images: list[RetrievalImage], ctx: TaskContext, needed: list[int], geometry: str
    ) -> None:
        self.dataset = RetrievalImageDataset(images, ctx.image_size, geometry)
        self.pixels: dict[int, Tensor] = {}
        loader = DataLoader(
            _EvalImages(images, ctx.image_size, needed, skip_bad=False, geometry=geometry),
            batch_size=64,
            collate_fn=retrieval_image_collate,
            num_workers=ctx.num_workers,
        )
        for batch in loader:
            self.pixels.update(zip(batch["index"].tolist(), batch["image"]))

    def get(self, indices: list[int]) -> Tensor:
        """-> (P, 3, S, S) uint8."""
        for i in indices:
            if i not in self.pixels:
                self.pixels[i] = retrieval_image_collate([self.dataset[i]])["image"][0]
        return torch.stack([self.pixels[i] for i in indices])
