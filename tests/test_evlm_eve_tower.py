"""EVLM with its vision tower from an EVE run (`evlm_tiny_eve_tower`): the config resolves, the tower of a
real EVE pre-training checkpoint (a 1-step `eve-pretrain` run, saved by the trainer's DeepSpeed engine) is
loaded weight for weight, and a missing EVE run is one line naming the path and `eve-pretrain`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from eve_ds.cli.pretrain import main
from eve_ds.convert.ds_checkpoint import read_eve_config, resolve_tag_dir
from eve_ds.models.evlm.vision import EVEVision
from eve_ds.train.config import ConfigError, load_config
from eve_ds.train.evaluation import load_evlm_checkpoint
from eve_ds.train.family import family_of
from eve_ds.train.preflight import start_problems
from eve_ds.train.stages import stage0_config
from eve_ds.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

EVE_RUN = "runs/eve_tiny_synthetic"


def eve_overrides(cache: Path) -> list[str]:
    """A 1-step eve_tiny_synthetic run (the default run's model, its experts included)."""
    return [
        "train.max_steps=1",
        "train.checkpoint_every=1",
        "train.eval_every=100",
        "train.log_every=1",
        f"data.cache_dir={cache}",
        "data.synthetic_num_train=16",
        "data.synthetic_num_val=4",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "optim.warmup_steps=1",
    ]


def test_the_config_resolves_to_the_default_eve_run_as_tower():
    cfg = load_config("evlm_tiny_eve_tower")
    m = cfg.model
    assert (m.vision, m.vision_path) == ("eve", EVE_RUN)
    assert (m.image_size, m.vision_patch, m.vision_width, m.vision_depth) == (64, 16, 128, 4)
    assert m.feature_layers == [2, 3] and m.stage == "stage1"
    assert cfg.optim.phase_start == 0.25 and cfg.optim.phase_params == ["encoder.vision.*"]
    # stage 0 (text only) builds the flavor's scratch tower and no LR phase: nothing of the EVE run
    s0 = stage0_config(cfg)
    assert (s0.model.vision, s0.model.vision_path, s0.optim.phase_start) == ("timm", "", None)


def test_the_tower_holds_the_eve_checkpoints_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eve = Trainer(load_config("eve_tiny_synthetic", eve_overrides(tmp_path / "data")), Path(EVE_RUN))
    assert eve.train() == 0
    saved = {k.removeprefix("encoder."): v for k, v in eve.engine.module.state_dict().items()}
    cfg = load_config("evlm_tiny_eve_tower", [f"data.cache_dir={tmp_path / 'data'}"])
    assert start_problems(cfg) == []
    model = family_of(cfg).build_model(cfg)  # the run's build: the tower read from the run directory
    tower = model.encoder.vision
    assert isinstance(tower, EVEVision)
    got = tower.encoder.state_dict()
    assert set(got) <= set(saved) and len(got) > 50
    assert any(".deepspeed_experts." in k for k in got)  # the MoE experts, out of their own files
    for k, v in got.items():
        assert torch.equal(v, saved[k]), k
    # the latter half trains ([paper] stage 1), the first half stays frozen
    trains = {i for i, b in enumerate(tower.blocks) if all(p.requires_grad for p in b.parameters())}
    frozen = {i for i, b in enumerate(tower.blocks) if not any(p.requires_grad for p in b.parameters())}
    assert (trains, frozen) == ({2, 3}, {0, 1})
    feats = tower(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in feats] == [torch.Size([2, 17, 128])] * 2
    # a tower that does not fit the config is refused by name
    with pytest.raises(ValueError, match=r"model\.vision_patch=8"):
        family_of(cfg).build_model(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vision_patch=8))
        )


def test_a_missing_eve_run_is_one_line_naming_the_path_and_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("evlm_tiny_eve_tower")
    (problem,) = start_problems(cfg)
    assert f"model.vision_path='{EVE_RUN}'" in problem and "`eve-pretrain`" in problem
    with pytest.raises(ConfigError, match="eve-pretrain"):
        family_of(cfg).build_model(cfg)
    run = tmp_path / "runs" / "evlm"
    assert main(["--config", "evlm_tiny_eve_tower", "--run-dir", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and EVE_RUN in err[0] and "eve-pretrain" in err[0], err
    assert not (run / "stage0").exists()  # refused before stage 0 trained anything


@pytest.mark.slow
def test_a_run_on_the_eve_tower_saves_its_trained_experts_and_evaluation_loads_them(tmp_path, monkeypatch):
    """The tower's MoE experts train (block 3) and live in DeepSpeed's expert files, not the module file:
    the evaluation's model must read them back (it refused the checkpoint before)."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "data"
    eve = Trainer(load_config("eve_tiny_synthetic", eve_overrides(cache)), Path(EVE_RUN))
    assert eve.train() == 0
    before = eve.engine.module.state_dict()
    small = [f"data.cache_dir={cache}", "task.synthetic_num_train=32", "task.synthetic_num_val=4",
             "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=4",
             "train.checkpoint_every=4", "train.eval_every=100", "optim.warmup_steps=1",
             "stage0.enabled=false"]  # fmt: skip
    cfg = load_config("evlm_tiny_eve_tower", small)
    trainer = Trainer(cfg, tmp_path / "runs" / "evlm")
    assert trainer.train() == 0
    trained = trainer.engine.module.state_dict()
    tag = resolve_tag_dir(tmp_path / "runs" / "evlm")
    assert list(tag.glob("layer_0_expert_*_model_states.pt"))
    loaded = load_evlm_checkpoint(tag, read_eve_config(tag)).state_dict()
    experts = [k for k in trained if ".deepspeed_experts." in k and k.startswith("encoder.vision.")]
    assert experts and all(torch.equal(loaded[k], trained[k]) for k in experts)
    old = [before[k.removeprefix("encoder.vision.")] for k in experts]
    assert any(not torch.equal(o, trained[k]) for o, k in zip(old, experts))  # they did train
    # The checkpoint names the tower it started from; when the EVE run goes on, a resume is refused.
    vision = read_eve_config(tag)["sources"]["vision"]
    eve_tag = resolve_tag_dir(EVE_RUN)
    assert (
        vision["checkpoint"] == str(eve_tag) and vision["step"] == 1 and len(vision["weights_sha256"]) == 64
    )
    longer = [a for a in eve_overrides(cache) if not a.startswith("train.max_steps")] + ["train.max_steps=2"]
    assert Trainer(load_config("eve_tiny_synthetic", longer), Path(EVE_RUN), allow_changes=True).train() == 0
    assert resolve_tag_dir(EVE_RUN) != eve_tag
    family = family_of(cfg)
    with pytest.raises(ConfigError, match=r"not the one this run started from .* point model.vision_path at"):
        family.check_resume(family.build_model(cfg), tag)
    pinned = load_config("evlm_tiny_eve_tower", [*small, f"model.vision_path={eve_tag}"])
    family.check_resume(family.build_model(pinned), tag)  # the tag it started from: no problem
