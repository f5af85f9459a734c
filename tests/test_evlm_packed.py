"""EVLM trained on packed shards through the one trainer (`task.name=evlm_packed`): the full-scale stage-1
config at stand-in sizes, on rows `eve-make-shards --format interleaved` packed from an OBELICS-style file
with PNG and JPEG images; exact resume; checkpoints without the frozen weights; the manifest's tokenizer
checked against the LM's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import image_bytes
from test_evlm_stages import STANDIN, TINY_LM, TINY_VIT

from eve_ds.cli.make_shards import main as make_shards_main
from eve_ds.cli.pretrain import main
from eve_ds.train.checkpoint import MODULE_FILE, latest_complete, module_file_keys
from eve_ds.train.config import ConfigError, load_config
from eve_ds.train.family import family_of
from eve_ds.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 2  # media tokens per image (model.num_media_tokens, --media-tokens)
WORDS = [
    "a",
    "the",
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "ball",
    "is",
    "on",
    "left",
    "of",
    "right",
    "and",
    "sits",
    "near",
    "under",
    "big",
    "small",
]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def save_lm(path: Path) -> str:
    """A tiny Qwen2 and a word-level tokenizer (ids < 30; the media row 155 unused), both save_pretrained."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    layout = {k: v for k, v in TINY_LM.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **layout)).save_pretrained(path)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return str(path)


def obelics(root: Path, name: str, n: int, seed: int) -> str:
    """`n` OBELICS documents (parallel `texts` / `images` lists, null where the other holds the entry): an
    image of one colour, then text that names the colour; odd documents have a second image (JPEG)."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        c1, c2 = (list(COLOURS)[int(j)] for j in torch.randint(0, 3, (2,), generator=g))
        (root / f"{name}{i}a.png").write_bytes(image_bytes(COLOURS[c1], fmt="PNG", size=(40, 30)))
        texts, images = [None, f"a {c1} ball"], [f"{name}{i}a.png", None]
        if i % 2:
            (root / f"{name}{i}b.jpg").write_bytes(image_bytes(COLOURS[c2], fmt="JPEG", size=(30, 36)))
            texts, images = [*texts, None, f"and a {c2} cat"], [*images, f"{name}{i}b.jpg", None]
        lines.append(json.dumps({"texts": texts, "images": images}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_shards(src: str, root: Path, out: Path, tokenizer: str) -> None:
    argv = ["--format", "interleaved", "--input", src, "--image-root", str(root), "--output", str(out),
            "--tokenizer", tokenizer, "--pack-tokens", "24", "--max-images", "3", "--media-tokens", str(K),
            "--samples-per-shard", "6"]  # fmt: skip
    assert make_shards_main(argv) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """The variables evlm_14b_pt reads, pointing to the tiny LM, a tiny EVA02-E file and packed corpora
    (${EVE_DATA_ROOT}/evlm/pt_captions, pt_interleaved), plus held-out rows (VAL)."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("evlm_packed")
    lm = save_lm(root / "lm")
    torch.manual_seed(0)
    vit = timm.create_model("eva02_enormous_patch14_clip_224", num_classes=0, **TINY_VIT)
    save_file(vit.state_dict(), str(root / "vit.safetensors"))
    images = root / "images"
    images.mkdir()
    data = root / "data" / "evlm"
    make_shards(obelics(images, "cap", 24, seed=1), images, data / "pt_captions", lm)
    make_shards(obelics(images, "web", 24, seed=2), images, data / "pt_interleaved", lm)
    make_shards(obelics(images, "val", 8, seed=3), images, root / "val", lm)
    return {"EVLM_LM_PATH": lm, "EVLM_VIT_PATH": str(root / "vit.safetensors"),
            "EVE_DATA_ROOT": str(root / "data"), "VAL": str(root / "val")}  # fmt: skip


@pytest.fixture
def env(monkeypatch, world) -> dict[str, str]:
    for k, v in world.items():
        monkeypatch.setenv(k, v)
    return world


def tiny(world: dict, **extra) -> list[str]:
    """evlm_14b_pt at the stand-in sizes, on the CPU: 6 steps of 4 rows (2 x accumulation 2)."""
    base = {
        "model.num_media_tokens": K,
        "model.lm_dtype": "float32",
        "train.device": "cpu",
        "train.ds_config": "zero2_cpu",
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.max_steps": 6,
        "train.checkpoint_every": 3,
        "train.eval_every": 3,
        "train.log_every": 1,
        "train.deterministic": "true",
        "optim.warmup_steps": 1,
        "optim.lr": 3e-3,
        "data.num_workers": 1,
        "data.val": world["VAL"],
    }
    base.update(extra)
    return [*STANDIN, *(f"{k}={v}" for k, v in base.items())]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, world) -> Trainer:
    mp = pytest.MonkeyPatch()
    for k, v in world.items():
        mp.setenv(k, v)
    try:
        trainer = Trainer(load_config("evlm_14b_pt", tiny(world)), tmp_path_factory.mktemp("run"))
        assert trainer.train() == 0
    finally:
        mp.undo()
    return trainer


def test_the_stage_config_trains_on_packed_shards_and_validates_blind(uninterrupted):
    run = uninterrupted.run_dir
    steps = losses(run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and all(0 < v < 20 for v in steps.values())
    assert min(steps[5], steps[6]) < steps[1]  # it learns the colour words
    m = json.loads((run / "final_metrics.json").read_text())
    assert m["num_samples"] > 0 and m["caption_lm_loss"] > 0 and m["caption_lm_loss_blind"] > 0
    assert m["caption_lm_loss"] != m["caption_lm_loss_blind"]  # the rolled images change the loss
    assert uninterrupted.cfg.task.name == "evlm_packed"


def test_frozen_weights_are_bitwise_unchanged_trainable_ones_moved_and_left_out(uninterrupted):
    cfg, module = uninterrupted.cfg, uninterrupted.engine.module
    torch.manual_seed(cfg.train.seed)  # the trainer's build: the LM and tower from their files
    fresh = family_of(cfg).build_model(cfg).state_dict()
    now = module.state_dict()
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.lm.") for n in frozen) and "encoder.media_tokens" in trainable
    assert all(torch.equal(now[n], fresh[n]) for n in frozen)
    fusion = [n for n in trainable if not n.startswith("encoder.vision.")]
    assert all(not torch.equal(now[n], fresh[n]) for n in fusion if n.endswith("attn_gate"))
    assert sum(not torch.equal(now[n], fresh[n]) for n in fusion) > len(fusion) // 2
    tag = latest_complete(uninterrupted.run_dir / "checkpoints")
    assert set(now) - module_file_keys(tag) == frozen  # the module file lacks exactly the frozen weights


def test_stop_and_rerun_equals_the_uninterrupted_run(tmp_path, env, uninterrupted):
    args = ["--config", "evlm_14b_pt", "--run-dir", str(tmp_path), *tiny(env)]
    assert main([*args, "train.stop_after=4"]) == 0
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    assert main(args) == 0
    assert losses(tmp_path) == losses(uninterrupted.run_dir)  # bitwise: train.deterministic
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert (
        final["caption_lm_loss"]
        == json.loads((uninterrupted.run_dir / "final_metrics.json").read_text())["caption_lm_loss"]
    )


def test_a_checkpoint_missing_a_trainable_tensor_is_refused_by_name(tmp_path, env, uninterrupted):
    shutil.copytree(uninterrupted.run_dir, tmp_path, dirs_exist_ok=True)
    tag = latest_complete(tmp_path / "checkpoints")
    state = torch.load(tag / MODULE_FILE, map_location="cpu", weights_only=False)
    name = "encoder.media_tokens"
    del state["module"][name]
    torch.save(state, tag / MODULE_FILE)
    cfg = load_config("evlm_14b_pt", tiny(env, **{"train.max_steps": 7}))
    with pytest.raises(ConfigError, match=rf"{MODULE_FILE} lacks the trainable tensor '{name}'"):
        Trainer(cfg, tmp_path, allow_changes=True).train()


def test_shards_packed_with_another_tokenizer_are_refused_naming_both(tmp_path, env, world):
    other = save_lm(tmp_path / "other")  # the same words in another order: other ids
    (Path(other) / "tokenizer.json").write_text(
        (Path(other) / "tokenizer.json")
        .read_text()
        .replace('"red": 5', '"red": 6')
        .replace('"green": 6', '"green": 5')
    )
    src = obelics(tmp_path, "x", 4, seed=4)
    make_shards(src, tmp_path, tmp_path / "shards", other)
    cfg = load_config(
        "evlm_14b_pt", tiny(env, **{"data.train": f"[{{name: x, shards: {tmp_path / 'shards'}}}]"})
    )
    with pytest.raises(ValueError) as e:
        Trainer(cfg, tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and "data.train[x].shards" in msg
    assert other in msg and env["EVLM_LM_PATH"] in msg and "model.lm_path=" in msg
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
