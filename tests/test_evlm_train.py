"""EVLM on the shared trainer: the family-aware model config, the synthetic caption task, an end-to-end run
through `eve-pretrain`, exact resume with the frozen weights left out of the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from eve_ds.cli.pretrain import main
from eve_ds.models.config import EVEConfig
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.tasks.base import TaskContext, build_task
from eve_ds.tasks.config import TaskConfig
from eve_ds.tasks.evlm_synthetic.data import MEDIA, VOCAB, collate
from eve_ds.train.config import ConfigError, from_dict, load_config, save_config
from eve_ds.train.family import family_of, source_record
from eve_ds.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evlm_cache")


def small(cache_dir: Path, **extra) -> list[str]:
    """Overrides for a seconds-long tiny run: 64 scenes, batches of 4, deterministic."""
    base = {
        "data.cache_dir": str(cache_dir),
        "task.synthetic_num_train": 64,
        "task.synthetic_num_val": 8,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 4,
        "train.max_steps": 4,
        "train.log_every": 1,
        "train.eval_every": 1000,
        "train.checkpoint_every": 2,
        "train.deterministic": "true",
        "optim.warmup_steps": 1,
        "optim.lr": 3e-3,
        "stage0.max_steps": 2,
        "stage0.batch_size": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


# -- config ---------------------------------------------------------------------------------------------------


def test_evlm_flavors_build_an_evlm_config_and_eve_configs_read_as_before(tmp_path):
    cfg = load_config("evlm_tiny_synthetic")
    assert isinstance(cfg.model, EVLMConfig) and cfg.model.media_token_id == VOCAB.index(MEDIA)
    assert family_of(cfg).name == "evlm"
    eve = load_config("eve_tiny_synthetic")
    assert isinstance(eve.model, EVEConfig) and family_of(eve).name == "eve"
    for c in (cfg, eve):  # a saved config.yaml reads back to the same config
        save_config(c, tmp_path / "config.yaml")
        assert from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == c
    with pytest.raises(ConfigError, match=r"model\.r_xcc.*model\.r_xc"):
        load_config("evlm_tiny_synthetic", ["model.r_xcc=0.3"])
    with pytest.raises(ConfigError, match=r"model\.stage"):
        load_config("evlm_tiny_synthetic", ["model.stage=stage9"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.r_xc'"):  # EVE has no such key
        load_config("eve_tiny_synthetic", ["model.r_xc=0.3"])


def test_caption_rows_label_only_the_caption_and_the_task_checks_the_model(cache_dir):
    cfg = load_config("evlm_tiny_synthetic", [f"data.cache_dir={cache_dir}"])
    ctx = TaskContext(
        tokenizer=None, cache_dir=str(cache_dir), image_size=64, max_text_len=0, model=cfg.model
    )
    task = build_task(cfg.task, ctx)
    task.prepare()
    ds = task.dataset("train")
    items = [it for it in (ds[i] for i in range(20)) if it["kind"] == "caption"][:3]
    first = next(ds[i] for i in range(20) if ds[i]["kind"] == "caption")
    assert items[0]["scene"] == first["scene"]  # pure: the same item again
    batch = collate(items)
    K, tok = cfg.model.num_media_tokens, task.tokenizer
    row, labels = batch["input_ids"][0], batch["labels"][0]
    assert (
        row[:K].tolist() == [VOCAB.index(MEDIA)] * K and tok.convert_ids_to_tokens(int(row[K])) == "caption:"
    )
    words = [w for w in tok.convert_ids_to_tokens(labels[labels >= 0].tolist())]
    caption = " ".join(words[:-1])
    assert words[-1] == "<eos>" and caption.startswith("a ") and "caption:" not in words
    assert batch["image"].shape == (3, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert (batch["lo"][0, batch["valid"][0]] == 0).all()  # every token of the row reads its image
    family = family_of(cfg)  # the MFU's FLOP count (used on GPUs only): LM + xattn per token, ViT per image
    assert family.batch_shape(batch) == (batch["input_ids"].shape[1], 1)
    small_row = family.flops_per_sample(cfg, (10, 1))
    assert family.flops_per_sample(cfg, (20, 1)) > small_row > family.flops_per_sample(cfg, (10, 0)) > 0
    bad = build_task(TaskConfig(name="evlm_synthetic", synthetic=True), ctx)
    ctx.model = load_config("evlm_tiny_synthetic", ["model.media_token_id=5"]).model
    with pytest.raises(ValueError, match=r"model\.media_token_id=5"):
        bad.prepare()


def test_checkpoints_record_the_frozen_sources_with_the_hash_of_their_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    rec = source_record(str(tmp_path))
    assert rec["path"] == str(tmp_path) and len(rec["config_sha256"]) == 64
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    assert source_record(str(tmp_path))["config_sha256"] != rec["config_sha256"]
    assert source_record("") is None
    cfg = load_config("evlm_tiny_synthetic", [f"model.lm_path={tmp_path}"])
    assert family_of(cfg).checkpoint_config(cfg)["sources"]["lm"] == source_record(str(tmp_path))


# -- training -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> Path:
    run = tmp_path_factory.mktemp("evlm_full")
    assert main(["--config", "evlm_tiny_synthetic", "--run-dir", str(run), *small(cache_dir)]) == 0
    return run


def test_a_run_through_eve_pretrain_writes_final_metrics(uninterrupted):
    m = json.loads((uninterrupted / "final_metrics.json").read_text())
    assert m["step"] == 4 and m["num_samples"] == 8
    for key in ("caption_lm_loss", "caption_lm_tok_acc", "colour_word_acc"):
        assert key in m and f"{key}_blind" in m
    assert 0 < m["caption_lm_loss"] < 10 and m["train_caption_lm_loss"] > 0
    steps = losses(uninterrupted)
    assert sorted(steps) == [1, 2, 3, 4] and steps[4] < steps[1]  # it learns something in 4 steps
    saved = json.loads((uninterrupted / "checkpoints" / "step_00000004" / "eve_config.json").read_text())
    assert saved["family"] == "evlm" and saved["sources"]["vision"] is None
    assert saved["sources"]["lm"]["path"] == str((uninterrupted / "lm").resolve())  # stage 0's LM


def test_stop_and_rerun_equals_the_uninterrupted_run(tmp_path, cache_dir, uninterrupted):
    args = ["--config", "evlm_tiny_synthetic", "--run-dir", str(tmp_path), *small(cache_dir)]
    assert main([*args, "train.stop_after=2"]) == 0
    assert sorted(losses(tmp_path)) == [1, 2]
    assert main(args) == 0
    assert losses(tmp_path) == losses(uninterrupted)  # bitwise: train.deterministic


def test_frozen_weights_are_unchanged_and_left_out_of_the_checkpoint(tmp_path, cache_dir):
    cfg = load_config("evlm_tiny_synthetic", small(cache_dir, **{"train.max_steps": 2}))
    trainer = Trainer(cfg, tmp_path)
    assert trainer.train() == 0
    torch.manual_seed(cfg.train.seed)  # the trainer's build: the same random LM and initial weights
    fresh = family_of(cfg).build_model(trainer.cfg).state_dict()
    trained = trainer.engine.module
    frozen = {n for n, p in trained.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.lm.model.layers.0.layer.") for n in frozen)
    assert any(n.startswith("encoder.vision.") for n in frozen) and "encoder.media_tokens" in trainable
    now = trained.state_dict()
    assert all(torch.equal(now[n], fresh[n]) for n in frozen)
    assert all(not torch.equal(now[n], fresh[n]) for n in ("encoder.media_tokens",))
    changed = [n for n in trainable if not torch.equal(now[n], fresh[n])]
    assert len(changed) > len(trainable) // 2  # gates get a gradient only once the xattn outputs do
    module = torch.load(tmp_path / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]  # fmt: skip
    assert trainable <= set(module) and not set(module) & frozen
    # DeepSpeed filters by parameter name: the tiny LM's head, tied to the frozen embedding, is an alias
    # that named_parameters() does not list, so it stays (evlm_14b's Qwen1.5 head is untied and frozen).
    assert set(module) - trainable == {"encoder.lm.lm_head.weight"}
