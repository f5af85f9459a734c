"""The default run's diagnostic scripts (benchmarks/default_run_*.py): the attention they report is the
attention the model computes, the conv stem never looks across a patch border, the study collects what a
run wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import make_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import default_run_attention as attention
import default_run_conv_stem as conv_stem
import default_run_study as study

from eve_ds.models.config import eve_tiny
from eve_ds.models.layers import Attention
from eve_ds.objectives import ObjectiveConfig, PretrainingModel


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
    assert study.command("current", [study.CONV], tmp_path / "J")[1].endswith("default_run_conv_stem.py")
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
