"""The fine-tuning harness: resolution change on load, the resumable example order, head LR groups."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eve_ds.convert.beit import load_init_weights
from eve_ds.convert.export import write_native
from eve_ds.convert.resolution import adapt_resolution
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.tasks.base import EpochBatchSampler
from eve_ds.train.engine import param_groups


@pytest.fixture(scope="module")
def export_64(tmp_path_factory):
    """A native export of a pre-trained eve_tiny at 64 px with recognisable position tables."""
    torch.manual_seed(0)
    cfg = get_config("eve_tiny")
    model = PretrainingModel(cfg, ObjectiveConfig())
    with torch.no_grad():
        grid = torch.arange(16.0).view(1, 16, 1).expand(1, 16, cfg.hidden_size)  # (1, P, D) ramp over patches
        model.encoder.pos_embed[:, 1:] = grid
        model.encoder.pos_embed[:, 0] = -7.0  # the [CLS] entry
    dst = tmp_path_factory.mktemp("export") / "tiny64"
    dst.mkdir()
    write_native(
        dst, model.state_dict(), {"model": cfg.to_dict(), "objective": vars(ObjectiveConfig())}, "fp32"
    )
    return dst, model.state_dict()


def test_same_resolution_is_a_bitwise_no_op(export_64):
    _, sd = export_64
    own = {k: v.shape for k, v in sd.items()}
    copy = {k: v.clone() for k, v in sd.items()}
    assert adapt_resolution(copy, own) == []
    assert all(torch.equal(copy[k], sd[k]) for k in sd)


def test_64_to_96_px_loads_strictly_with_resized_tables(export_64):
    path, sd = export_64
    cfg = dataclasses.replace(get_config("eve_tiny"), image_size=96)
    torch.manual_seed(1)
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=["mlm"]))
    report = load_init_weights(model, path, ep_rank=0)
    assert report["fresh"] == []  # every weight of the 96 px model came from the 64 px checkpoint
    pos = model.encoder.pos_embed.detach()
    assert pos.shape == (1, 1 + 36, cfg.hidden_size)
    assert torch.equal(pos[0, 0], torch.full((cfg.hidden_size,), -7.0))  # [CLS] kept as it was
    ramp = pos[0, 1:, 0].view(6, 6)  # resampled 4x4 ramp 0..15 (row-major): grows along rows and columns
    assert (ramp[:, 1:] > ramp[:, :-1]).all() and (ramp[1:] > ramp[:-1]).all()
    assert ramp.min() >= -1.0 and ramp.max() <= 16.0
    for i, block in enumerate(model.encoder.blocks):
        table = block.attn.rel_pos.relative_position_bias_table.detach()
        old = sd[f"encoder.blocks.{i}.attn.rel_pos.relative_position_bias_table"]
        assert table.shape == (11 * 11 + 3, old.shape[1])
        assert torch.equal(table[-3:], old[-3:])  # the cls->patch, patch->cls, cls->cls entries


def test_epoch_batch_sampler_is_resumable_and_covers_each_epoch():
    n, b, w = 50, 4, 3
    full = [EpochBatchSampler(n, b, r, w, seed=5) for r in range(w)]
    first = {r: [batch for _, batch in zip(range(9), iter(s))] for r, s in enumerate(full)}
    per_epoch = n // (b * w)  # 4 global batches per epoch, the last 2 examples dropped
    epoch0 = [i for r in range(w) for batch in first[r][:per_epoch] for e, i in batch if e == 0]
    assert len(epoch0) == len(set(epoch0)) == per_epoch * b * w
    assert {e for batch in first[0][per_epoch:] for e, _ in batch} == {1, 2}
    resumed = EpochBatchSampler(n, b, 1, w, seed=5, start_batch=6)
    assert [batch for _, batch in zip(range(3), iter(resumed))] == first[1][6:9]
    other_seed = next(iter(EpochBatchSampler(n, b, 0, w, seed=6)))
    assert other_seed != first[0][0]


def test_heads_get_their_own_learning_rate():
    model = PretrainingModel(
        get_config("eve_tiny"), ObjectiveConfig(objectives=["vqa"], heads={"vqa": {"num_answers": 10}})
    )
    groups = {g["name"]: g for g in param_groups(model, 0.01, lr=1e-4, head_lr_mult=10.0)}
    assert groups["decay"]["lr"] == 1e-4 and groups["decay_head"]["lr"] == pytest.approx(1e-3)
    head = {id(p) for p in model.objectives.parameters()}
    assert all(id(p) in head for p in groups["decay_head"]["params"] + groups["no_decay_head"]["params"])
    assert not any(id(p) in head for p in groups["decay"]["params"])
    plain = [g["name"] for g in param_groups(model, 0.01, lr=1e-4)]
    assert plain[:2] == ["decay", "no_decay"]  # no head split: the pre-training layout
