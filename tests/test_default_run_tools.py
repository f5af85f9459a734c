"""The default run's diagnostic scripts (research/default_run/): the attention they report is the
attention the model computes, the conv stem never looks across a patch border, the study collects what a
run wrote."""

from __future__ import annotations

import json

import torch
from conftest import make_batch

from eve_ds.models.config import eve_tiny
from eve_ds.models.layers import Attention
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from research.default_run import attention, conv_stem, focused, masks, study


def test_patches_of_a_box():
    assert attention.patches_of([0, 0, 16, 16], 16, 4) == [0]  # x1/y1 exclusive: one patch exactly
    assert attention.patches_of([10, 20, 30, 40], 16, 4) == [4, 5, 8, 9]
    assert attention.patches_of([50, 50, 63, 63], 16, 4) == [15]


def test_recomputed_attention_is_the_models():
    """Each block's recomputed softmax attention (padding and relative position bias included), applied to
    that block's values, gives the block's attention output."""
    torch.manual_seed(0)
    cfg = eve_tiny(init_std=0.05)
    model = PretrainingModel(cfg, ObjectiveConfig(objectives=["mlm"])).eval()
    batch = make_batch(cfg, B=3, L=10)
    batch["text_mask"][0, 6:] = 0  # padding in one row
    outputs, inputs = [], []

    def keep(_module, args, out):  # returns None: the output is left as it is
        inputs.append(args[0])
        outputs.append(out)

    hooks = [m.register_forward_hook(keep) for m in model.encoder.modules() if isinstance(m, Attention)]
    image = batch["image"].float()
    with torch.no_grad():
        model.encoder(image, batch["text_ids"], batch["text_mask"])
    for h in hooks:
        h.remove()
    maps = attention.attention_maps(model, image, batch["text_ids"], batch["text_mask"])
    blocks = [b.attn for b in model.encoder.blocks]
    assert len(maps) == len(blocks) == len(outputs)
    for attn_map, block, x, out in zip(maps, blocks, inputs, outputs):
        B, N, D = x.shape
        v = block.heads(x)[2]
        mixed = (attn_map @ v).transpose(1, 2).reshape(B, N, D)
        torch.testing.assert_close(block.proj(mixed), out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(attn_map.sum(-1), torch.ones(attn_map.shape[:-1]))
        assert float(attn_map[0, :, :, -1].abs().max()) < 1e-6  # nothing attends to padding


def test_conv_stem_is_per_patch():
    stem = conv_stem.ConvPatchEmbed(64, 16, 3, 128)
    x = torch.randn(2, 3, 64, 64)
    out = stem(x)
    assert out.shape == (2, 16, 128)
    y = x.clone()
    y[:, :, 16:32, 32:48] += 1.0  # patch (row 1, column 2) = token 6
    changed = (stem(y) - out).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [i == 6 for i in range(16)]


def test_study_commands_and_collection(tmp_path):
    cmd = study.command("previous", ["model.init_std=0.05"], tmp_path / "C1")
    assert cmd[1:3] == ["-m", "eve_ds.cli.pretrain"] and cmd[-1] == "model.init_std=0.05"
    assert "model.init_std=0.02" in cmd and "train.max_steps=2000" in cmd
    assert study.command("current", [study.CONV], tmp_path / "J")[1:3] == [
        "-m",
        "research.default_run.conv_stem",
    ]
    run = tmp_path / "run"
    run.mkdir()
    val = {"step": 500, "val/attr_word_acc": 0.6, "val/attr_word_acc_shuffled_images": 0.3}
    for c in study.CATEGORIES:
        val[f"val/attr_word_acc/{c}"], val[f"val/attr_word_acc_shuffled_images/{c}"] = 0.7, 0.2
    lines = [{"step": 10, "samples_per_s": 90.0}, {"step": 20, "samples_per_s": 100.0}, val]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    got = study.collect(run)
    assert got["pairs_per_s_median"] == 100.0 and got["evals"][0]["shape_shuffled"] == 0.2
    table = study.markdown([{"row": "X", "overrides": ["a=1"], **got}])
    assert "| X | `a=1` | 500 | 0.600 (0.300) | 0.70 (0.20) |" in table
    assert study.collect(tmp_path / "missing") is None


def test_focused_tasks_texts_masks_and_a_short_run():
    """The diagnostic captions state what the scene shows; each task masks exactly its category's words; a
    task trains and scores end to end."""
    from eve_ds.data.pipeline import load_tokenizer
    from eve_ds.data.synthetic import attribute_token_ids

    scene = {
        "shapes": [
            {"colour": "red", "shape": "circle", "size": "small", "bbox": [2, 30, 16, 44]},
            {"colour": "blue", "shape": "square", "size": "large", "bbox": [30, 30, 56, 56]},
        ],
        "relations": [{"subject": 0, "relation": "left", "object": 1}],
    }
    assert focused.describe(scene, "position") == "a red left"
    assert focused.describe(scene, "short") == "red left blue"
    assert focused.describe(scene, "corpus") == "a small red circle to the left of a large blue square"

    tokenizer = load_tokenizer("bert-base-uncased")
    cats = {c: torch.tensor(v) for c, v in attribute_token_ids(tokenizer).items()}
    split = focused.make_split(tokenizer, seed=3, n=8, num_shapes=2, style="corpus")
    assert (split["shapes"] == 2).all()
    inputs, where = focused.masked_batch(
        split["ids"], split["mask"], "shape", cats, tokenizer.mask_token_id, None
    )
    assert torch.isin(split["ids"][where], cats["shape"]).all() and int(where.sum()) == 16  # two per caption
    assert (inputs[~where] == split["ids"][~where]).all()

    curve = focused.run_task("curriculum", 2, 1, 32, tokenizer, cats, num_val=16)
    assert [c["step"] for c in curve] == [1, 2]
    assert set(curve[-1]["scores"]) == {"colour", "shape", "size", "relation"}


def test_mask_scenes_carry_their_shape_counts():
    """The by-number-of-shapes breakdown groups scenes by the shapes they really hold."""
    import numpy as np

    from eve_ds.data.pipeline import load_tokenizer
    from eve_ds.data.synthetic import make_scene

    images, ids, mask, counts = masks.scenes_batch(12, 64, load_tokenizer("bert-base-uncased"), 40)
    expected = [len(make_scene(np.random.default_rng([7, 77, i]), 64)["shapes"]) for i in range(12)]
    assert counts.tolist() == expected and images.shape[0] == ids.shape[0] == mask.shape[0] == 12
    assert set(expected) == {1, 2, 3}


def test_attribute_weighted_mask_keeps_the_ratio_and_prefers_attribute_words():
    from eve_ds.data.pipeline import load_tokenizer
    from eve_ds.data.synthetic import attribute_token_ids
    from eve_ds.objectives.masking import maskable_text_positions

    tokenizer = load_tokenizer("bert-base-uncased")
    cats = {c: torch.tensor(v) for c, v in attribute_token_ids(tokenizer).items()}
    split = focused.make_split(tokenizer, seed=5, n=64, num_shapes=0, style="corpus")
    ids, mask = split["ids"], split["mask"]
    maskable = maskable_text_positions(mask)
    attr = torch.isin(ids, torch.cat(list(cats.values())))
    gen = torch.Generator().manual_seed(0)
    inputs, where = focused.attribute_weighted_mask(ids, mask, cats, tokenizer.mask_token_id, gen, weight=1e6)
    assert (where.sum(1) == torch.round(maskable.sum(1).float() * 0.5).long()).all()
    assert not (where & ~maskable).any() and (inputs[where] == tokenizer.mask_token_id).all()
    # With an overwhelming weight every caption masks attribute words before any other token.
    n_attr = (attr & maskable).sum(1)
    assert ((where & attr).sum(1) == torch.minimum(n_attr, where.sum(1))).all()


def test_patch_grid_orders_every_relation():
    """The 4 x 4 grid can express every relation: research/default_run/README.md relies on it."""
    total, share = focused.grid_orders_relations(num_scenes=200)
    assert total > 100 and share == 1.0
