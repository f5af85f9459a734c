"""The Table 1 baselines: ITC, ITM (hard negatives from ITC) and MIM with visual-token targets."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port, make_batch

from eve_ds.bench.throughput import DEFAULT_TASK_SETS
from eve_ds.models.config import get_config
from eve_ds.models.eve import EVEModel
from eve_ds.objectives import OBJECTIVES, ObjectiveConfig, PretrainingModel
from eve_ds.objectives.contrastive import ImageTextContrastive, sample_hard_negatives
from eve_ds.objectives.mim_token import (
    RandomCodebookTokenizer,
    VisualTokenizer,
    block_mask,
    token_mim_mask,
)


def dense_tiny():
    """eve_tiny without soft-router blocks: no DeepSpeed MoE, so plain gloo processes can run it."""
    return get_config("eve_tiny", num_soft_blocks=0)


# -- ITC -------------------------------------------------------------------------------------------------


def test_itc_loss_matches_hand_computed_info_nce():
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    enc, itc = EVEModel(cfg), ImageTextContrastive(cfg, ObjectiveConfig(objectives=["itc"]))
    batch = make_batch(cfg, 3)
    out = itc(enc, batch, None)
    img, txt, _ = itc.features(enc, batch)
    img, txt = img.detach(), txt.detach()
    s = 1 / 0.07  # initial temperature
    total = 0.0
    for i in range(3):
        row_i2t = [s * float(img[i] @ txt[j]) for j in range(3)]
        row_t2i = [s * float(txt[i] @ img[j]) for j in range(3)]
        total += -row_i2t[i] + math.log(sum(math.exp(v) for v in row_i2t))
        total += -row_t2i[i] + math.log(sum(math.exp(v) for v in row_t2i))
    assert out["itc_loss"].item() == pytest.approx(total / 6, rel=1e-5)
    assert out["itc_temperature"].item() == pytest.approx(0.07, rel=1e-5)
    assert len(out["encoder_outputs"]) == 2
    # the image-only pass has no text, the text-only pass no image
    assert out["encoder_outputs"][0].hidden.shape[1] == cfg.num_patches + 1
    assert out["encoder_outputs"][1].n_image == 0


def _itc_rank(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = dense_tiny()
        enc, itc = EVEModel(cfg), ImageTextContrastive(cfg, ObjectiveConfig(objectives=["itc"]))
        full = make_batch(cfg, 4)
        local = {k: v[rank * 2 : rank * 2 + 2] for k, v in full.items()}
        loss = itc(enc, local, None)["itc_loss"]
        loss.backward()
        grad = itc.image_proj.weight.grad.clone()
        torch.distributed.all_reduce(grad)  # data-parallel average of the gradients
        torch.distributed.all_reduce(loss := loss.detach().clone())
        if rank == 0:
            result["loss"], result["grad"] = loss.item() / world, grad / world
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_itc_gather_across_two_ranks_equals_single_process():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        result = manager.dict()
        mp.start_processes(_itc_rank, args=(2, free_port(), result), nprocs=2, start_method="spawn")
        loss2, grad2 = result["loss"], result["grad"]
    torch.manual_seed(0)
    cfg = dense_tiny()
    enc, itc = EVEModel(cfg), ImageTextContrastive(cfg, ObjectiveConfig(objectives=["itc"]))
    loss = itc(enc, make_batch(cfg, 4), None)["itc_loss"]
    loss.backward()
    assert loss2 == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(grad2, itc.image_proj.weight.grad, rtol=1e-4, atol=1e-7)


# -- ITM -------------------------------------------------------------------------------------------------


def test_itm_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    B = 6
    sim = torch.randn(B, B, generator=g)
    sim.diagonal().add_(50.0)  # the positive dominates the softmax
    picks = torch.stack([sample_hard_negatives(sim, g) for _ in range(500)])  # (500, B)
    assert not (picks == torch.arange(B)).any()
    assert picks.min() >= 0 and picks.max() < B
    # Sampling follows the similarities: a much closer negative is drawn almost always.
    sim2 = torch.zeros(B, B)
    sim2[:, 0], sim2[0, 1] = 10.0, 10.0
    picks2 = torch.stack([sample_hard_negatives(sim2, g) for _ in range(200)])
    assert (picks2[:, 1:] == 0).float().mean() > 0.95 and (picks2[:, 0] == 1).float().mean() > 0.95
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_itm_requires_itc_before_it():
    with pytest.raises(ValueError, match="itc listed before itm"):
        ObjectiveConfig(objectives=["mlm", "itm"]).validate()
    with pytest.raises(ValueError, match="itc listed before itm"):
        ObjectiveConfig(objectives=["itm", "itc"]).validate()
    ObjectiveConfig(objectives=["itc", "itm"]).validate()


def test_itm_fusion_pass_has_positives_and_two_hard_negatives_per_pair():
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=["itc", "itm"]))
    calls = []
    model.encoder.register_forward_hook(lambda m, args, out: calls.append(args))
    batch = make_batch(cfg, 4)
    with torch.no_grad():
        model(batch)
    image, ids = calls[-1][0], calls[-1][1]  # the fusion pass: (3B, C, S, S), (3B, L)
    assert (
        image.shape[0] == ids.shape[0] == 12
    )  # 4 positives + 4 (image, negative text) + 4 (neg. image, text)
    for i in range(4):
        assert torch.equal(image[i], batch["image"][i]) and torch.equal(ids[i], batch["text_ids"][i])
        assert torch.equal(image[4 + i], batch["image"][i]) and not torch.equal(
            ids[4 + i], batch["text_ids"][i]
        )
        assert not torch.equal(image[8 + i], batch["image"][i]) and torch.equal(
            ids[8 + i], batch["text_ids"][i]
        )


@pytest.mark.parametrize(("says_match", "accuracy"), [(True, 1 / 3), (False, 2 / 3)])
def test_itm_accuracy_and_loss_of_a_constant_classifier(says_match, accuracy):
    """A head that always answers "match" is right on the B positives only (1/3); "no match", on the 2B
    negatives (2/3). The loss is then the cross-entropy of constant logits (0, 2) or (2, 0)."""
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=["itc", "itm"]))
    head = model.objectives["itm"].head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 2.0] if says_match else [2.0, 0.0]))
        out = model(make_batch(cfg, 4))
    assert out["itm_acc"].item() == pytest.approx(accuracy)
    right, wrong = -math.log(math.exp(2) / (1 + math.exp(2))), -math.log(1 / (1 + math.exp(2)))
    expected = accuracy * right + (1 - accuracy) * wrong
    assert out["itm_loss"].item() == pytest.approx(expected, rel=1e-6)


def _itm_run(negatives: str, batch: dict) -> tuple[dict, dict]:
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=["itc", "itm"], itm_negatives=negatives))
    out = model(dict(batch), torch.Generator().manual_seed(3))
    out["itm_loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("image_id", [None, [0, 0, 1, 2, 2, 3]])
def test_itm_global_negatives_equal_local_ones_at_world_size_one(image_id):
    batch = make_batch(get_config("eve_tiny"), 6)
    if image_id is not None:
        batch["image_id"] = torch.tensor(image_id)
    local, local_grads = _itm_run("local", batch)
    glob, glob_grads = _itm_run("global", batch)
    assert torch.equal(local["itm_loss"], glob["itm_loss"]) and torch.equal(local["itm_acc"], glob["itm_acc"])
    assert local_grads.keys() == glob_grads.keys()
    # The same negatives fused (the loss is bit-equal); the gradients up to the CPU's threaded reductions.
    for k, grad in local_grads.items():
        torch.testing.assert_close(glob_grads[k], grad, rtol=1e-6, atol=1e-9)


def _itm_global_rank(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = dense_tiny()
        full = make_batch(cfg, 4)
        full["image_id"] = torch.tensor([7, 7, 8, 8])  # each rank's two pairs: captions of one image
        local = {k: v[rank * 2 : rank * 2 + 2] for k, v in full.items()}
        for negatives in ("local", "global"):
            model = PretrainingModel(cfg, ObjectiveConfig(objectives=["itc", "itm"], itm_negatives=negatives))
            seen = []
            model.encoder.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args))
            model(dict(local), torch.Generator().manual_seed(rank))
            image, ids = seen[-1][0], seen[-1][1]  # the fusion pass
            other = 1 - rank
            theirs = {tuple(t.tolist()) for t in full["text_ids"][other * 2 : other * 2 + 2]}
            result[rank, negatives] = (
                image.shape[0],
                all(tuple(t.tolist()) in theirs for t in ids[2:4]),  # the negative texts: the other rank's
            )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_itm_global_negatives_come_from_the_other_rank():
    """Each rank holds two captions of one image: locally there is no negative (positives only), over the
    gathered batch every row gets one from the other rank."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        result = manager.dict()
        mp.start_processes(_itm_global_rank, args=(2, free_port(), result), nprocs=2, start_method="spawn")
        result = dict(result)
    for rank in (0, 1):
        assert result[rank, "local"][0] == 2  # the two positives only
        assert result[rank, "global"] == (6, True)  # + 2 (image, negative text) + 2 (negative image, text)


# -- MIM with visual tokens ------------------------------------------------------------------------------


def test_block_and_random_masks_have_the_exact_count():
    import random

    rng = random.Random(0)
    for grid, n in ((14, 78), (4, 6), (8, 26)):
        m = block_mask(grid, n, rng)
        assert len(m) == grid * grid and sum(m) == n
    masks = token_mim_mask(5, 14, 0.4, "random", torch.device("cpu"), torch.Generator().manual_seed(0))
    assert masks.shape == (5, 196) and (masks.sum(1) == 78).all()
    blocks = token_mim_mask(5, 14, 0.4, "block", torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (blocks.sum(1) == 78).all()

    # block-wise: masked patches touch each other far more often than random ones do
    def neighbours(m):
        g = m.view(-1, 14, 14).float()
        return ((g[:, 1:] * g[:, :-1]).sum() + (g[:, :, 1:] * g[:, :, :-1]).sum()).item()

    assert neighbours(blocks) > 1.5 * neighbours(masks)


def test_mask_token_hook_in_the_encoder():
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    plain = EVEModel(cfg)
    assert plain.mask_token is None and "mask_token" not in plain.state_dict()
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, cfg.num_patches, dtype=torch.bool)
    mask[0, [1, 5]] = True
    with pytest.raises(ValueError, match="image_mask_token=True"):
        plain.embed_image(image, patch_mask=mask)
    enc = EVEModel(cfg, image_mask_token=True)
    x = enc.embed_image(image, patch_mask=mask)  # (B, 1 + P, D)
    ref = enc.embed_image(image)
    expect = enc.mask_token[0, 0] + enc.pos_embed[0, 1:] + enc.type_embed.weight[0]  # (P, D)
    torch.testing.assert_close(x[0, 2], expect[1])
    torch.testing.assert_close(x[0, 6], expect[5])
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[[2, 6]] = False
    torch.testing.assert_close(x[0, keep], ref[0, keep])
    torch.testing.assert_close(x[1], ref[1])
    with pytest.raises(ValueError, match="exclusive"):
        enc.embed_image(image, keep_ids=torch.zeros(2, 4, dtype=torch.long), patch_mask=mask)


def test_mim_token_all_patches_enter_and_loss_only_on_masked_patches():
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    obj_cfg = ObjectiveConfig(objectives=["mim_token"], mim_token_vocab_size=64)
    model = PretrainingModel(cfg, obj_cfg)
    assert model.encoder.mask_token is not None
    mim = model.objectives["mim_token"]
    assert isinstance(mim.tokenizer, VisualTokenizer)
    batch = make_batch(cfg, 3)
    mask = token_mim_mask(
        3, cfg.grid_size, 0.4, "block", torch.device("cpu"), torch.Generator().manual_seed(1)
    )
    batch["mim_token_mask"] = mask
    seen = {}

    def encoder(*args, **kwargs):
        out = model.encoder(*args, **kwargs)
        out.hidden.retain_grad()
        seen["out"], seen["kwargs"] = out, kwargs
        return out

    res = mim(encoder, batch, None)
    res["mim_token_loss"].backward()
    out = seen["out"]
    assert out.n_image == cfg.num_patches + 1 and seen["kwargs"]["patch_mask"] is mask  # all patches enter
    grad = out.hidden.grad[:, 1 : out.n_image].abs().sum(-1)  # (B, P)
    assert (grad[~mask] == 0).all() and (grad[mask] > 0).all()
    # the loss is the cross-entropy against the tokenizer's ids of the masked patches
    target = mim.tokenizer(batch["image"])[mask]
    logits = mim.head(out.hidden[:, 1 : out.n_image][mask].detach())
    assert res["mim_token_loss"].item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)


def test_random_codebook_tokenizer_is_deterministic_and_in_range():
    tok = RandomCodebookTokenizer(16, 3, 128)
    img = torch.randn(2, 3, 64, 64)
    ids = tok(img)
    assert ids.shape == (2, 16) and ids.dtype == torch.long and ids.min() >= 0 and ids.max() < 128
    torch.testing.assert_close(ids, RandomCodebookTokenizer(16, 3, 128)(img))


# -- every task set --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_set", [*DEFAULT_TASK_SETS, ["mlm", "itc", "itm", "mim_token"]], ids=lambda t: "+".join(t)
)
def test_every_task_set_runs_forward_backward(task_set):
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=task_set))
    out = model(make_batch(cfg, 4), torch.Generator().manual_seed(0))
    for name in task_set:  # each loss is named after its objective
        assert torch.isfinite(out[f"{name}_loss"])
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name in task_set:
        grads = [p.grad for p in model.objectives[name].parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    if "mim_token" in task_set:
        assert model.encoder.mask_token.grad is not None and model.encoder.mask_token.grad.abs().sum() > 0
    assert set(task_set) <= set(OBJECTIVES)
