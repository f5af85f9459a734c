"""EVLM's stage mechanics on the real DeepSpeed engine (CPU): the stage-1 LR phase (a parameter set that
joins the one schedule at `optim.phase_start`), exact resume across the phase start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eve_ds.train.config import ConfigError, load_config
from eve_ds.train.engine import lr_lambdas, phase_step
from eve_ds.train.family import family_of
from eve_ds.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PHASE = {"optim.phase_start": 0.5, "optim.phase_params": "[encoder.vision.*]"}


def small(cache_dir: Path, **extra) -> list[str]:
    """A seconds-long tiny EVLM run of 6 steps whose latter-half ViT joins at step 3."""
    base = {
        "data.cache_dir": str(cache_dir),
        "task.synthetic_num_train": 64,
        "task.synthetic_num_val": 8,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 4,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.eval_every": 1000,
        "train.checkpoint_every": 3,
        "train.deterministic": "true",
        "optim.warmup_steps": 1,
        "optim.lr": 3e-3,
        **PHASE,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def vision_changed(trainer: Trainer) -> tuple[int, int]:
    """(trainable ViT tensors that differ from the initial build, trainable ViT tensors)."""
    torch.manual_seed(trainer.cfg.train.seed)  # the trainer's build: the same initial weights
    fresh = family_of(trainer.cfg).build_model(trainer.cfg).state_dict()
    module = trainer.engine.module
    now = module.state_dict()
    late = [n for n, p in module.named_parameters() if p.requires_grad and n.startswith("encoder.vision.")]
    return sum(not torch.equal(now[n], fresh[n]) for n in late), len(late)


def test_phase_keys_are_checked_and_the_late_groups_get_factor_zero_until_the_phase_start():
    with pytest.raises(ConfigError, match=r"optim\.phase_start"):
        load_config("evlm_tiny_synthetic", ["optim.phase_start=1.5", "optim.phase_params=[x]"])
    with pytest.raises(ConfigError, match=r"optim\.phase_params"):
        load_config("evlm_tiny_synthetic", ["optim.phase_start=0.25"])
    cfg = load_config("evlm_tiny_synthetic", ["train.max_steps=100", "optim.warmup_steps=10",
                                              "optim.phase_start=0.25", "optim.phase_params=[v*]"])  # fmt: skip
    assert phase_step(cfg) == 25
    early, late = lr_lambdas(cfg, [{"late": False}, {"late": True}])
    assert [late(s) for s in (0, 9, 24)] == [0.0, 0.0, 0.0]
    assert early(9) == 1.0 and late(25) == early(25) > 0 and late(99) == early(99)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evlm_stages_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> Trainer:
    trainer = Trainer(load_config("evlm_tiny_synthetic", small(cache_dir)), tmp_path_factory.mktemp("full"))
    assert trainer.train() == 0
    return trainer


def test_the_late_vit_is_bitwise_unchanged_before_the_phase_and_trains_after(tmp_path, cache_dir):
    cfg = load_config("evlm_tiny_synthetic", small(cache_dir, **{"train.stop_after": 3}))
    trainer = Trainer(cfg, tmp_path)
    groups = trainer.engine.optimizer.optimizer.param_groups  # ZeRO's wrapped torch AdamW
    assert {g["name"] for g in groups if g["late"]} == {"decay_late", "no_decay_late"}
    assert trainer.train() == 0
    assert all(g["lr"] > 0 for g in groups if g["late"])  # the LR the 4th step applies: phase started
    changed, total = vision_changed(trainer)
    assert total > 0 and changed == 0  # steps 1-3 at LR 0: weight decay included, nothing moved
    assert any(g["lr"] > 0 for g in groups if not g["late"])


def test_resume_across_the_phase_start_equals_the_uninterrupted_run(tmp_path, cache_dir, uninterrupted):
    changed, total = vision_changed(uninterrupted)
    assert changed == total  # steps 4-6 updated every trainable ViT tensor
    cfg = load_config("evlm_tiny_synthetic", small(cache_dir, **{"train.stop_after": 3}))
    assert Trainer(cfg, tmp_path).train() == 0
    resumed = Trainer(load_config("evlm_tiny_synthetic", small(cache_dir)), tmp_path)
    assert resumed.train() == 0
    assert losses(tmp_path) == losses(uninterrupted.run_dir)  # bitwise: train.deterministic
    a, b = resumed.engine.module.state_dict(), uninterrupted.engine.module.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
