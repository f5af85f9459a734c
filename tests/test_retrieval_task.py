"""Image-text retrieval through the shared trainer: image-id positives in ITC, hard negatives that never
pick the same image, `eve-finetune` + `eve-evaluate` on the synthetic COCO in the Karpathy layout, ITM
re-ranking with k = N against scoring every pair, unreadable evaluation images, and a 2-rank run whose
distributed evaluation equals the 1-rank one."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, make_batch

from eve_ds.cli.evaluate import main as evaluate
from eve_ds.cli.finetune import main as finetune
from eve_ds.data import load_tokenizer
from eve_ds.models.config import get_config
from eve_ds.models.eve import EVEModel
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.contrastive import ImageTextContrastive, info_nce, sample_hard_negatives
from eve_ds.tasks.base import TaskContext
from eve_ds.tasks.retrieval.data import RetrievalDataError, load_image, read_karpathy, texts_of
from eve_ds.tasks.retrieval.eval import recall_at_k
from eve_ds.tasks.retrieval.synthetic import ensure_synthetic_retrieval
from eve_ds.tasks.retrieval.task import retrieval_scores
from eve_ds.train.config import load_config
from eve_ds.utils.image import normalize_image

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
METRIC_KEYS = {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean", "num_images", "num_texts"}
SIZES = {"num_train": 40, "num_val": 8, "num_test": 6}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("retrieval_cache"))


@pytest.fixture(scope="module")
def synthetic(cache) -> str:
    return ensure_synthetic_retrieval(cache, seed=0, **SIZES, image_size=64)


def overrides(cache: str, **extra) -> list[str]:
    base = {
        "data.cache_dir": cache,
        "task.synthetic_num_train": SIZES["num_train"],
        "task.synthetic_num_val": SIZES["num_val"],
        "task.synthetic_num_test": SIZES["num_test"],
        "task.rerank_k": 10,
        "train.init_from": "none",
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.max_steps": 3,
        "train.log_every": 1,
        "data.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


# -- ITC / ITM with image ids ------------------------------------------------------------------------------


def test_itc_targets_spread_over_every_caption_of_the_image():
    """Rows 0 and 1 are two captions of image 7: each row's target is 1/2 on both of them."""
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # (B, E): rows 0, 1 the same image
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.4], [0.1, 1.0]]), dim=-1)
    ids = torch.tensor([7, 7, 9])
    positives = ids[:, None] == ids[None, :]
    scale = torch.tensor(10.0)
    loss = info_nce(img, txt, img, txt, 0, scale, positives)
    total = 0.0
    for sims in (scale * img @ txt.t(), scale * txt @ img.t()):
        for i in range(3):
            pos = [j for j in range(3) if ids[j] == ids[i]]
            log_z = math.log(sum(math.exp(float(sims[i, j])) for j in range(3)))
            total += -sum(float(sims[i, j]) - log_z for j in pos) / len(pos)
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)
    # Unique ids give the one-positive InfoNCE of pre-training exactly.
    unique = torch.eye(3, dtype=torch.bool)
    assert info_nce(img, txt, img, txt, 0, scale, unique).item() == pytest.approx(
        info_nce(img, txt, img, txt, 0, scale).item(), rel=1e-6
    )


def test_itc_objective_reads_image_ids_and_scores_accuracy_by_image():
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    enc, itc = EVEModel(cfg), ImageTextContrastive(cfg, ObjectiveConfig(objectives=["itc"]))
    batch = make_batch(cfg, 4)
    # Pairs 0 and 1: two captions of one image (different pixels, as two augmentations would give).
    batch["image_id"] = torch.tensor([3, 3, 4, 5])
    out = itc(enc, {**batch, "context": (context := {})}, None)
    img, txt, _ = itc.features(enc, batch)
    positives = batch["image_id"][:, None] == batch["image_id"][None, :]
    expected = info_nce(img, txt, img, txt, 0, torch.tensor(1 / 0.07), positives)
    assert out["itc_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    without_ids = itc(enc, {k: v for k, v in batch.items() if k != "image_id"}, None)["itc_loss"]
    assert out["itc_loss"].item() != pytest.approx(without_ids.item(), rel=1e-3)  # the ids matter
    assert torch.equal(context["itc"]["same_image"], positives)
    best = (img @ txt.t()).argmax(1)
    assert out["itc_acc"].item() == pytest.approx(positives[torch.arange(4), best].float().mean().item())


def test_hard_negatives_never_pick_a_caption_of_the_same_image():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    same = ids[:, None] == ids[None, :]
    sim = torch.randn(6, 6, generator=g)
    sim[same] += 50.0  # the same-image captions would dominate the softmax
    picks = torch.stack([sample_hard_negatives(sim, g, same) for _ in range(300)])  # (300, B)
    assert not same[torch.arange(6).expand_as(picks), picks].any()
    assert picks.min() >= 0 and picks.max() < 6
    assert set(picks[:, 0].tolist()) == {2, 3, 4, 5}  # every other image is drawn
    # A row whose image fills the whole batch has no negative: -1.
    lonely = torch.tensor([5, 5, 5, 8])
    got = sample_hard_negatives(torch.zeros(4, 4), g, lonely[:, None] == lonely[None, :])
    assert got[:3].tolist() == [3, 3, 3] and got[3].item() in (0, 1, 2)
    alone = sample_hard_negatives(torch.zeros(2, 2), g, torch.ones(2, 2, dtype=torch.bool))
    assert alone.tolist() == [-1, -1]


def _itc_rank(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss = itc_loss_with_ids(slice(rank * 2, rank * 2 + 2))
        torch.distributed.all_reduce(loss)
        if rank == 0:
            result["loss"] = loss.item() / world
    finally:
        torch.distributed.destroy_process_group()


def itc_loss_with_ids(rows: slice) -> torch.Tensor:
    """ITC loss of `rows` of a 4-pair batch whose pairs 0 and 2 are captions of one image."""
    torch.manual_seed(0)
    cfg = get_config("eve_tiny", num_soft_blocks=0)  # no DeepSpeed MoE: plain gloo processes run it
    enc, itc = EVEModel(cfg), ImageTextContrastive(cfg, ObjectiveConfig(objectives=["itc"]))
    batch = {**make_batch(cfg, 4), "image_id": torch.tensor([1, 2, 1, 3])}
    with torch.no_grad():
        return itc(enc, {k: v[rows] for k, v in batch.items()}, None)["itc_loss"]


@pytest.mark.slow
def test_itc_image_id_positives_across_two_ranks_equal_one_process():
    """Pairs 0 (rank 0) and 2 (rank 1) share an image: the gathered ids make each the other's positive."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        result = manager.dict()
        mp.start_processes(_itc_rank, args=(2, free_port(), result), nprocs=2, start_method="spawn")
        two = result["loss"]
    assert two == pytest.approx(itc_loss_with_ids(slice(0, 4)).item(), rel=1e-5)


def fusion_pairs(ids: list[int]) -> tuple[list[tuple[int, int]], dict]:
    """(the (image, text) batch positions of every pair in ITM's fusion pass, the model's outputs) for a
    4-pair batch with these image ids."""
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=["itc", "itm"]))
    calls = []
    model.encoder.register_forward_hook(lambda m, args, out: calls.append(args))
    batch = {**make_batch(cfg, 4), "image_id": torch.tensor(ids)}
    with torch.no_grad():
        out = model(batch)
    image, text_ids = calls[-1][0], calls[-1][1]  # the fusion pass
    find = lambda x, pool: next(i for i in range(4) if torch.equal(x, pool[i]))  # noqa: E731
    return [
        (find(image[r], batch["image"]), find(text_ids[r], batch["text_ids"])) for r in range(len(image))
    ], out


def test_itm_fusion_batch_holds_no_same_image_negative():
    ids = [5, 5, 5, 8]
    pairs, out = fusion_pairs(ids)
    assert pairs[:4] == [(0, 0), (1, 1), (2, 2), (3, 3)]  # the positives
    assert len(pairs) == 12  # every row has a negative of another image: B + B + B
    assert all(ids[i] != ids[t] for i, t in pairs[4:])
    assert [t for _, t in pairs[4:7]] == [3, 3, 3]  # image 5's only negative caption is image 8's
    assert torch.isfinite(out["itm_loss"])
    # One image fills the batch: no negatives at all, ITM trains on the 4 positives.
    pairs, out = fusion_pairs([5, 5, 5, 5])
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 3)] and torch.isfinite(out["itm_loss"])


# -- the task: fine-tuning, evaluation ---------------------------------------------------------------------


def test_finetune_writes_recalls_and_eve_evaluate_reads_the_test_split(
    tmp_path, cache, synthetic, capsys, one_thread
):
    run = tmp_path / "run"
    assert finetune(["--config", "retrieval_tiny_synthetic", "--run-dir", str(run), *overrides(cache)]) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert METRIC_KEYS | {f"itc_{k}" for k in ("tr_r1", "ir_r10", "r_mean")} | {"eval_seconds"} <= set(final)
    assert final["step"] == 3 and "train_itc_loss" in final and "train_itm_loss" in final
    val, _ = read_karpathy(synthetic, "coco", "val")
    assert final["num_images"] == 8 and final["num_texts"] == len(texts_of(val)[0])
    for key in ("tr_r1", "ir_r5", "itc_tr_r10"):
        assert 0.0 <= final[key] <= 100.0
    assert final["ir_r10"] == 100.0 and final["itc_ir_r10"] == 100.0  # 8 images: every one is in the top 10
    capsys.readouterr()
    argv = ["--checkpoint", str(run), "--task", "retrieval", "--data-root", synthetic, "--split", "test"]
    rankings = tmp_path / "rankings.json"
    assert evaluate([*argv, "--rerank-k", "3", "--predictions", str(rankings), "--json"]) == 0
    test = json.loads(capsys.readouterr().out)
    assert set(test) >= METRIC_KEYS and test["num_images"] == 6
    saved = json.loads(rankings.read_text())
    assert len(saved["image_retrieval"]) == test["num_texts"] and len(saved["text_retrieval"]) == 6


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return PretrainingModel(get_config("eve_tiny"), ObjectiveConfig(objectives=["itc", "itm"])).eval()


def context() -> TaskContext:
    return TaskContext(
        tokenizer=load_tokenizer("bert-base-uncased"),
        cache_dir="",
        image_size=64,
        max_text_len=40,
        num_workers=0,
    )


def test_rerank_with_k_n_ranks_every_pair_by_itm(synthetic, tiny_model, one_thread):
    images, _ = read_karpathy(synthetic, "coco", "val")
    images = images[:5]
    ctx = context()
    scores = retrieval_scores(tiny_model, images, ctx, k=1000, device="cpu", batch_size=7)
    texts, t2i_map = texts_of(images)
    # Every pair scored by the ITM head directly, one image against all texts at a time.
    tok = ctx.tokenizer(texts, max_length=40, truncation=True, padding="max_length", return_tensors="pt")
    pixels = [torch.from_numpy(load_image(im.image_path, 64)) for im in images]
    full = torch.zeros(len(images), len(texts))
    with torch.no_grad():
        for i, p in enumerate(pixels):
            image = normalize_image(p.permute(2, 0, 1)[None].expand(len(texts), -1, -1, -1).contiguous())
            full[i] = tiny_model.objectives["itm"].match_score(
                tiny_model.encoder, image, tok["input_ids"], tok["attention_mask"]
            )
    torch.testing.assert_close(scores.i2t, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores.t2i, full.t(), rtol=1e-4, atol=1e-4)
    metrics = scores.metrics()
    expected = recall_at_k(full, t2i_map)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["num_images"] == 5 and metrics["num_texts"] == len(texts)
    # The ITC numbers are those of the all-pairs similarities, independent of the re-ranking.
    assert {k: metrics[f"itc_{k}"] for k in expected} == pytest.approx(recall_at_k(scores.itc, t2i_map))


def test_unreadable_evaluation_image_is_an_error_unless_skipped(tmp_path, synthetic, tiny_model, one_thread):
    root = tmp_path / "coco"
    shutil.copytree(synthetic, root)
    images, _ = read_karpathy(str(root), "coco", "test")
    Path(images[2].image_path).write_bytes(b"not a jpeg")
    with pytest.raises(RetrievalDataError, match=os.path.basename(images[2].image_path)):
        retrieval_scores(tiny_model, images, context(), k=3, device="cpu", batch_size=4)
    scores = retrieval_scores(tiny_model, images, context(), k=3, device="cpu", batch_size=4, skip_bad=True)
    m = scores.metrics()
    assert m["num_images"] == 5 and m["num_skipped_images"] == 1
    assert m["num_texts"] == sum(len(im.captions) for im in images) - len(images[2].captions)


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_rank(tmp_path, cache, synthetic):
    """A 2-rank fine-tuning run evaluates the val split with the features, ITC scores and ITM re-ranking
    split over the ranks; eve-evaluate of its final checkpoint on one process gives the same recalls."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [
        "--master_port",
        str(free_port()),
        "-m",
        "eve_ds.cli.finetune",
        "--config",
        "retrieval_tiny_synthetic",
    ]
    args = overrides(cache, **{"train.global_batch_size": 16, "task.eval_split": "val"})
    proc = subprocess.run(
        [*cmd, "--run-dir", str(run), *args], env=env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 = data-parallel 2" in proc.stderr
    two = json.loads((run / "final_metrics.json").read_text())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eve_ds.cli.evaluate",
            "--checkpoint",
            str(run),
            "--task",
            "retrieval",
            "--data-root",
            synthetic,
            "--split",
            "val",
            "--batch-size",
            "8",
            "--json",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one = json.loads(out.stdout.strip().splitlines()[-1])
    keys = METRIC_KEYS | {f"itc_{k}" for k in METRIC_KEYS - {"num_images", "num_texts"}}
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
    assert two["num_images"] == 8


@pytest.mark.parametrize(
    ("name", "lr", "batch", "dataset"),
    [
        ("retrieval_coco_eve_base", 3.5e-5, 256, "coco"),
        ("retrieval_coco_eve_large", 5e-5, 256, "coco"),
        ("retrieval_flickr_eve_base", 1.5e-5, 128, "flickr30k"),
        ("retrieval_flickr_eve_large", 1.5e-5, 128, "flickr30k"),
    ],
)
def test_packaged_configs_have_the_paper_recipe(name, lr, batch, dataset):
    cfg = load_config(name)
    assert (cfg.optim.lr, cfg.train.global_batch_size, cfg.task.dataset) == (lr, batch, dataset)
    assert cfg.model.image_size == 384 and cfg.task.epochs == 10 and cfg.optim.weight_decay == 0.01
    assert cfg.optim.warmup_ratio == 0.1 and cfg.optim.schedule == "cosine"
    assert cfg.objective.objectives == ["itc", "itm"] and cfg.task.name == "retrieval"
    assert cfg.task.eval_split == "val" and cfg.task.rerank_k == 128
    assert cfg.train.init_from.startswith("${EVE_")  # a run to start from, named by an environment variable
