"""`eve-explain` on tiny trained models: valid PNGs with non-constant heat maps at the patch grid, the
explicit attention equal to the model's own, and routing counts equal to the expert loads the model
reports."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from infer_fixtures import tiny_pretraining_run, tiny_run
from PIL import Image

from eve_ds.cli.explain import main as explain
from eve_ds.infer import Predictor, VQAPredictor
from eve_ds.infer import attribution as ex
from eve_ds.infer import preprocess as pre


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    vqa, data = tiny_run("vqa", root)
    return {"vqa": vqa, "data": data, "msm": tiny_pretraining_run(root)}


def an_image(runs, tmp_path, size=(96, 72)) -> str:
    """A synthetic scene saved at another resolution and aspect ratio than the model's input."""
    src = sorted(glob.glob(os.path.join(runs["data"], "val2014", "*.jpg")))[0]
    path = tmp_path / "scene.png"
    Image.open(src).resize(size).save(path)
    return str(path)


def check_png(path, size_at_least=(200, 150)) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= size_at_least[0] and im.size[1] >= size_at_least[1]


def test_vqa_gradcam_png_and_heatmap_at_patch_grid(runs, tmp_path, capsys):
    image, out = an_image(runs, tmp_path), tmp_path / "vqa.png"
    argv = ["--checkpoint", str(runs["vqa"]), "--task", "vqa", "--image", image]
    assert explain([*argv, "--question", "what color is the circle?", "--out", str(out), "--json"]) == 0
    heat = torch.tensor(json.loads(capsys.readouterr().out)["heatmap"])
    assert heat.shape == (4, 4) and (heat >= 0).all() and heat.max() > heat.min()
    check_png(out)
    assert explain([*argv, "--question", "q", "--answer", "not-an-answer", "--out", str(out)]) == 2
    assert "not in the model's" in capsys.readouterr().err


def test_vqa_heatmap_follows_the_runs_image_geometry(tmp_path_factory, runs, tmp_path, capsys):
    """A run with task.image_geometry=official: eve-explain feeds the whole (non-square) image squeezed to
    S x S, as that run's evaluation does, not its centre square."""
    run, _ = tiny_run("vqa", tmp_path_factory.mktemp("official"), task__image_geometry="official")
    image, out = an_image(runs, tmp_path, size=(160, 64)), tmp_path / "vqa.png"
    question = "what color is the circle?"
    argv = ["--checkpoint", str(run), "--task", "vqa", "--image", image, "--question", question]
    assert explain([*argv, "--out", str(out), "--json"]) == 0
    got = torch.tensor(json.loads(capsys.readouterr().out)["heatmap"])
    check_png(out)
    p = VQAPredictor.from_pretrained(run)
    assert p.geometry == "official"
    maps = {}
    for geometry in ("official", "square_crop"):
        batch, _ = pre.vqa_batch([image], [question], p.vocab, p.ctx, geometry)
        maps[geometry] = ex.vqa_heat(p, batch, None).heatmap
    assert torch.allclose(got, maps["official"], atol=1e-6)
    assert not torch.allclose(got, maps["square_crop"], atol=1e-4)


def test_vqa_default_map_is_the_mean_of_the_blocks_maps(runs, tmp_path):
    p = VQAPredictor.from_pretrained(runs["vqa"])
    batch, _ = pre.vqa_batch([an_image(runs, tmp_path)], ["what color is the circle?"], p.vocab, p.ctx)
    per_block = [ex.vqa_heat(p, batch, None, layer).heatmap for layer in range(len(p.model.encoder.blocks))]
    mean = ex.vqa_heat(p, batch, None).heatmap
    assert torch.allclose(mean, torch.stack(per_block).mean(0), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(mean, per_block[-1], rtol=1e-2)


def test_explicit_attention_is_the_models_attention(runs, tmp_path):
    p = VQAPredictor.from_pretrained(runs["vqa"])
    batch, _ = pre.vqa_batch([an_image(runs, tmp_path)], ["what shape is the red object?"], p.vocab, p.ctx)
    want = p.logits(batch)
    with torch.no_grad(), ex.keep_attention(p.model.encoder, [1]) as (attn,):
        got = p.logits(batch)
        assert attn.kept_attn.shape[-1] == attn.kept_attn.shape[-2] and torch.allclose(
            attn.kept_attn.sum(-1), torch.ones(())
        )
    assert torch.allclose(got, want, atol=1e-5)
    assert "forward" not in vars(p.model.encoder.blocks[1].attn)  # the SDPA forward is back


def test_mlm_and_mim_figures(runs, tmp_path, capsys):
    image, base = an_image(runs, tmp_path), ["--checkpoint", str(runs["msm"]), "--image"]
    text = ["--text", "a small red circle"]
    assert (
        explain(
            [
                *base,
                image,
                "--task",
                "mlm",
                *text,
                "--word",
                "red",
                "--out",
                str(tmp_path / "m.png"),
                "--json",
            ]
        )
        == 0
    )
    heat = torch.tensor(json.loads(capsys.readouterr().out)["heatmap"])
    assert heat.shape == (4, 4) and heat.max() > heat.min()
    check_png(tmp_path / "m.png")
    argv = [
        *base,
        image,
        "--task",
        "mim",
        *text,
        "--box",
        "0,0,32,32",
        "--out",
        str(tmp_path / "i.png"),
        "--json",
    ]
    assert explain(argv) == 0
    words = json.loads(capsys.readouterr().out)
    assert words["tokens"] == ["a", "small", "red", "circle"] and len(set(words["values"])) > 1
    check_png(tmp_path / "i.png")
    assert (
        explain([*base, image, "--task", "mlm", *text, "--word", "blue", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert explain(["--checkpoint", str(runs["vqa"]), "--image", image, "--task", "mlm", *text, "--word", "red",
                    "--out", str(tmp_path / "x.png")]) == 2  # fmt: skip
    assert "no mlm head (its heads: vqa)" in capsys.readouterr().err


def test_routing_counts_equal_the_expert_loads_the_model_reports(runs, tmp_path, capsys):
    scenes = sorted(glob.glob(os.path.join(runs["data"], "val2014", "*.jpg")))[:3]
    texts = ["what color is the circle?", "how many shapes are there?", "is there a red square?"]
    listing = tmp_path / "inputs.tsv"
    listing.write_text("".join(f"{s}\t{t}\n" for s, t in zip(scenes, texts)))
    out = tmp_path / "routing.png"
    argv = ["--checkpoint", str(runs["vqa"]), "--task", "routing", "--inputs", str(listing)]
    assert explain([*argv, "--out", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    check_png(out)
    p = VQAPredictor.from_pretrained(runs["vqa"])
    batch, _ = pre.vqa_batch(scenes, texts, p.vocab, p.ctx)
    with torch.no_grad():
        reported = p.model(p.text_inputs(batch))[f"expert_load/block{got['block']}"]  # (2, E) shares
    counts = torch.tensor(got["counts"])
    real = int(batch["text_mask"].sum()) + len(scenes) * (1 + p.model.model_cfg.num_patches)
    assert counts.sum() == real * p.model.model_cfg.top_k  # every real token routed top_k times
    assert torch.allclose(counts / counts.sum(1, keepdim=True), reported, atol=1e-6)


def test_routing_over_a_generic_predictor_rejects_a_hard_block(runs):
    p = Predictor.from_pretrained(runs["vqa"])
    with pytest.raises(ValueError, match="not a soft-router block"):
        ex.routing_counts(p.model, [], block=0)
