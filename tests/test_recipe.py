"""The paper's runs as configured: corpora mixed as a union, every shard read, the BEiT v2 start checked by
`--dry-run`, BEiT/MAE weight decay, the fp32 pixel target, the load-balancing loss reduction."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch
from PIL import Image

from eve_ds.cli.make_shards import main as make_shards
from eve_ds.cli.pretrain import main as pretrain
from eve_ds.data.pipeline import corpus_shards, load_corpus, mixture
from eve_ds.data.stream import raw_stream
from eve_ds.data.transforms import batch_to_device
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.masking import patchify
from eve_ds.train.config import load_config
from eve_ds.train.engine import no_weight_decay
from eve_ds.utils.image import normalize_image


def make_corpus(root, name: str, pairs: int, per_shard: int = 10) -> str:
    """`pairs` image-caption pairs as shards + manifest under root/name, through eve-make-shards."""
    images = root / f"{name}_img"
    images.mkdir()
    lines = ["image,caption"]
    for i in range(pairs):
        Image.new("RGB", (8, 8), (i * 5 % 256, 40, 90)).save(images / f"{i}.jpg")
        lines.append(f"{i}.jpg,caption {i} of {name}")
    (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    out = str(root / name)
    argv = ["--format", "csv", "--input", str(root / f"{name}.csv"), "--image-root", str(images)]
    assert make_shards([*argv, "--output", out, "--samples-per-shard", str(per_shard)]) == 0
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return make_corpus(root, "big", 40), make_corpus(root, "small", 10)


def sampled_fractions(big: str, small: str, small_weight: float, n: int = 2000) -> dict[str, float]:
    cs = [load_corpus("big", big), load_corpus("small", small, weight=small_weight)]
    stream = raw_stream(cs, seed=0, stream=0, num_streams=1, start_slot=0, buffer=10)
    counts = collections.Counter(next(stream)["__corpus__"] for _ in range(n))
    return {k: v / n for k, v in counts.items()}


def test_corpora_are_mixed_by_size(corpora):
    big, small = corpora
    f = sampled_fractions(big, small, small_weight=1.0)
    assert f["big"] == pytest.approx(0.8, abs=0.05) and f["small"] == pytest.approx(0.2, abs=0.05)
    f = sampled_fractions(big, small, small_weight=4.0)  # 10 pairs x 4 = 40 pairs x 1
    assert f["big"] == pytest.approx(0.5, abs=0.05) and f["small"] == pytest.approx(0.5, abs=0.05)
    rows, steps = mixture([load_corpus("big", big), load_corpus("small", small)], global_batch_size=8)
    assert [(r["name"], r["pairs"], r["shards"]) for r in rows] == [("big", 40, 4), ("small", 10, 1)]
    assert [r["fraction"] for r in rows] == pytest.approx([0.8, 0.2]) and steps == 50 // 8


def test_every_shard_is_read(corpora):
    big, _ = corpora
    urls, manifest = corpus_shards(big)  # a directory: every shard of its manifest
    assert [os.path.basename(u) for u in urls] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert manifest == os.path.join(big, "manifest.json")
    with pytest.raises(ValueError, match=r"leaves out 2 of the 4 shards.*shard-000002.tar.*subset: true"):
        corpus_shards(f"{big}/shard-{{000000..000001}}.tar")
    urls, _ = corpus_shards(f"{big}/shard-{{000000..000001}}.tar", subset=True)
    assert len(urls) == 2
    assert sum(load_corpus("big", big).counts) == 40


def dry_run(capsys, *argv: str) -> tuple[int, dict]:
    code = pretrain(["--dry-run", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


def test_dry_run_without_init_path_names_the_key(capsys, monkeypatch, corpora):
    monkeypatch.delenv("EVE_BEITV2_BASE", raising=False)
    monkeypatch.setenv("EVE_DATA_ROOT", os.path.dirname(corpora[0]))
    code, report = dry_run(capsys, "--config", "eve_base_4m", "--world-size", "16")
    assert code == 2
    init = [p for p in report["problems"] if p.startswith("train.init_from")]
    assert len(init) == 1 and "beitv2_base_patch16_224" in init[0] and "import-beitv2" in init[0]
    # The 4M corpus's directories do not exist under this root: named, not a crash.
    assert any("data.train[coco]" in p for p in report["problems"])


def test_dry_run_reports_the_mixture_and_passes(capsys, corpora, tmp_path):
    big, small = corpora
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: {flavor: eve_tiny}\n"
        f"data: {{train: [{{name: big, shards: {big}}}, {{name: small, shards: {small}}}]}}\n"
        "train: {global_batch_size: 8, micro_batch_size: 4, init_from: none}\n"
    )
    code, report = dry_run(capsys, "--config", str(cfg), "--world-size", "2")
    assert code == 0, report["problems"]
    assert report["mixture"] == [
        {"name": "big", "pairs": 40, "shards": 4, "fraction": 0.8},
        {"name": "small", "pairs": 10, "shards": 1, "fraction": 0.2},
    ]
    assert report["steps_per_epoch"] == 6 and report["init_from"] is None
    os.remove(os.path.join(big, "shard-000003.tar"))  # a shard of the manifest is gone
    try:
        code, report = dry_run(capsys, "--config", str(cfg), "--world-size", "3")
    finally:
        make_corpus_shard_back(big)
    assert code == 2
    assert any("data.train[big]: 1 of 4 shard files missing" in p for p in report["problems"])
    assert any("global_batch_size=8 does not split over 3 ranks" in p for p in report["problems"])


def make_corpus_shard_back(big: str) -> None:
    """Rebuild the removed shard (the module's other tests read the corpus too)."""
    root = os.path.dirname(big)
    argv = ["--format", "csv", "--input", f"{root}/big.csv", "--image-root", f"{root}/big_img"]
    assert make_shards([*argv, "--output", big, "--samples-per-shard", "10"]) == 0


@pytest.fixture(scope="module")
def beitv2_files(tmp_path_factory):
    """A BEiT v2 base state dict in timm's layout (random weights) and one of a smaller BEiT."""
    import timm

    root = tmp_path_factory.mktemp("beit")
    torch.manual_seed(0)
    good = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0)
    torch.save(good.state_dict(), root / "beitv2_base.pth")
    small = timm.create_model("beitv2_base_patch16_224", pretrained=False, embed_dim=384, num_heads=6)
    torch.save(small.state_dict(), root / "beitv2_small.pth")
    return root / "beitv2_base.pth", root / "beitv2_small.pth"


@pytest.mark.slow
def test_dry_run_checks_the_init_checkpoint_shapes(capsys, monkeypatch, beitv2_files, corpora):
    good, small = beitv2_files
    monkeypatch.setenv("EVE_DATA_ROOT", os.path.dirname(corpora[0]))
    monkeypatch.setenv("EVE_BEITV2_BASE", str(good))
    _, report = dry_run(capsys, "--config", "eve_base_4m", "--world-size", "16")
    assert not [p for p in report["problems"] if "init_from" in p], report["problems"]
    _, report = dry_run(capsys, "--config", "eve_base_4m", "--world-size", "16", f"train.init_from={small}")
    (problem,) = [p for p in report["problems"] if "init_from" in p]
    assert "first mismatched shape encoder.cls_token: (1, 1, 384) in the checkpoint vs (1, 1, 768)" in problem


def test_trainer_stops_before_anything_without_init_path(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("EVE_BEITV2_BASE", raising=False)
    monkeypatch.setenv("EVE_DATA_ROOT", str(tmp_path))
    assert pretrain(["--config", "eve_base_4m", "--run-dir", str(tmp_path / "run")]) == 2
    assert "train.init_from" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written, no engine, no data


def test_weight_decay_groups_follow_beit_and_mae():
    model = PretrainingModel(get_config("eve_tiny"), ObjectiveConfig())
    no_decay = {n for n, p in model.named_parameters() if no_weight_decay(n, p)}
    decay = {n for n, p in model.named_parameters()} - no_decay
    tables = {
        "encoder.cls_token",
        "encoder.pos_embed",
        "encoder.text_pos_embed",
        "objectives.mim_pixel.decoder.mask_token",
        "objectives.mim_pixel.decoder.pos_embed",
        "encoder.blocks.3.ffn.moe.deepspeed_moe.gate.modality_bias",
        *(f"encoder.blocks.{i}.attn.rel_pos.relative_position_bias_table" for i in range(4)),
    }
    one_d = {n for n, p in model.named_parameters() if p.ndim == 1}
    assert no_decay == tables | one_d
    assert all(n.endswith(("bias", "weight")) for n in one_d)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2} - tables
    assert decay == matrices
    for name in ("encoder.patch_embed.proj.weight", "encoder.word_embed.weight", "encoder.type_embed.weight"):
        assert name in decay


def test_pixel_target_is_float32_from_the_uint8_image():
    cfg = get_config("eve_tiny")
    model = PretrainingModel(cfg, ObjectiveConfig())
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    batch = batch_to_device(
        {"image": pixels, "text_ids": torch.ones(2, 4, dtype=torch.long)}, "cpu", torch.bfloat16
    )
    assert batch["image"].dtype == torch.bfloat16 and batch["pixels"].dtype == torch.uint8
    target = model.objectives["mim_pixel"].target(batch)
    exact = patchify(normalize_image(pixels, torch.float32), cfg.patch_size)
    assert target.dtype == torch.float32 and torch.equal(target, exact)
    assert not torch.equal(exact, patchify(batch["image"].float(), cfg.patch_size))  # bf16 would round


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_aux_loss_reduction(reduction):
    cfg = get_config("eve_tiny")
    torch.manual_seed(0)
    model = PretrainingModel(cfg, ObjectiveConfig(aux_loss_reduction=reduction))
    batch = {
        "image": torch.randn(2, 3, 64, 64),
        "text_ids": torch.randint(1000, 2000, (2, 8)),
        "text_mask": torch.ones(2, 8, dtype=torch.long),
    }
    out = model(batch, generator=torch.Generator().manual_seed(0))
    calls = [k for k in out if k.startswith("expert_load/")]
    assert calls == ["expert_load/block3"]  # eve_tiny: one soft block, called by MLM and by MIM
    model.obj_cfg.aux_loss_reduction = "sum"
    total = model(batch, generator=torch.Generator().manual_seed(0))["aux_loss"]
    expected = total / 2 if reduction == "mean" else total  # 2 soft-router calls: MLM pass + MIM pass
    assert float(out["aux_loss"]) == pytest.approx(float(expected), rel=1e-6)


def test_packaged_paper_configs_need_beitv2(monkeypatch):
    monkeypatch.setenv("EVE_DATA_ROOT", "/data")
    for name, var in (("eve_base_4m", "BASE"), ("eve_large_4m", "LARGE"), ("eve_large_16m", "LARGE")):
        monkeypatch.delenv(f"EVE_BEITV2_{var}", raising=False)
        cfg = load_config(name)
        assert cfg.train.init_from == f"${{EVE_BEITV2_{var}}}"
        assert all(os.path.basename(c.shards) == c.name for c in cfg.data.train)  # directories
        monkeypatch.setenv(f"EVE_BEITV2_{var}", "/ckpt/beitv2")
        assert load_config(name).train.init_from == "/ckpt/beitv2"
        assert load_config(name, ["train.init_from=none"]).train.init_from is None
