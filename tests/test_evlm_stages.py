"""EVLM's stage mechanics on the real DeepSpeed engine (CPU): the stage-1 LR phase (a parameter set that
joins the one schedule at `optim.phase_start`), exact resume across the phase start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from eve_ds.train.config import CONFIG_DIR, ConfigError, load_config, phase_step
from eve_ds.train.engine import lr_lambdas
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


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


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


# -- chained stages -------------------------------------------------------------------------------------------


def test_stage_chain_loads_what_the_earlier_stage_trained_and_upcycles_into_the_moe(tmp_path, uninterrupted):
    """Stage 3 from a stage-1 run: the ViT blocks stage 1 trained and stage 3 freezes come from the stage-1
    checkpoint; EVLM-MoE from the same run starts as the dense model (upcycled, tanh(beta) = 0)."""
    src = uninterrupted.run_dir
    cache = uninterrupted.cfg.data.cache_dir
    args = small(Path(cache), **{"train.max_steps": 1})
    args = [a for a in args if not a.startswith("optim.phase")] + ["model.stage=stage3",
                                                                   f"train.init_from={src}"]  # fmt: skip
    trained = uninterrupted.engine.module.state_dict()
    dense = Trainer(load_config("evlm_tiny_synthetic", args), tmp_path / "sft")
    got = dense.engine.module.state_dict()
    block3 = [k for k in got if k.startswith("encoder.vision.vit.blocks.3.")]  # trained in 1, frozen in 3
    assert block3 and all(torch.equal(got[k], trained[k]) for k in block3)
    assert torch.equal(got["encoder.media_tokens"], trained["encoder.media_tokens"])
    moe = Trainer(load_config("evlm_tiny_synthetic", [*args, "model.flavor=evlm_tiny_moe"]), tmp_path / "moe")
    assert moe.train() == 0 and dense.train() == 0
    # the loss of step 1 is the initial model's (the forward before the first update)
    lm = {run: losses(tmp_path / run, "caption_lm_loss")[1] for run in ("moe", "sft")}
    assert lm["moe"] == pytest.approx(lm["sft"], abs=1e-5)  # the MoE's total adds its balancing loss
    rec = json.loads((tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()[0])
    load = rec["expert_load/block0/all"]  # (E,) shares of the routes, logged from the one row
    assert len(load) == 16 and sum(load) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        Trainer(
            load_config("evlm_tiny_synthetic", [*args[:-1], f"train.init_from={tmp_path}"]), tmp_path / "x"
        )


# -- the full-scale configs ---------------------------------------------------------------------------------

# evlm_14b's architecture at a size a test can save: the same Qwen2 and EVA02-E code, 64 wide.
TINY_LM = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, intermediate_size=128, vocab_size=160, tie_word_embeddings=False)  # fmt: skip
TINY_VIT = dict(img_size=28, patch_size=14, embed_dim=64, depth=4, mlp_ratio=2.0)
STANDIN = [
    "model.lm_layout={" + ", ".join(f"{k}: {v}" for k, v in TINY_LM.items()) + "}",
    "model.vision_width=64", "model.vision_depth=4", "model.vision_mlp=128", "model.feature_layers=[1,3]",
    "model.image_size=28", "model.r_xc=0.25", "model.media_token_id=155",
]  # fmt: skip
STAGES = ["evlm_14b_pt", "evlm_14b_cpt", "evlm_14b_sft", "evlm_14b_sft_moe"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, str]:
    """EVLM_LM_PATH: a tiny Qwen2 folder (save_pretrained + a 150-id tokenizer.json); EVLM_VIT_PATH: a
    tiny timm eva02_enormous_patch14_clip_224 in a safetensors file."""
    import timm
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("standins")
    layout = {k: v for k, v in TINY_LM.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **layout)).save_pretrained(root / "lm")
    vocab = {f"w{i}": i for i in range(150)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(root / "lm" / "tokenizer.json"))
    vit = timm.create_model("eva02_enormous_patch14_clip_224", num_classes=0, **TINY_VIT)
    save_file(vit.state_dict(), str(root / "vit.safetensors"))
    return {"EVLM_LM_PATH": str(root / "lm"), "EVLM_VIT_PATH": str(root / "vit.safetensors")}


CORPORA = ["pt_captions", "pt_interleaved", "cpt_vqa", "cpt_grounding", "cpt_ocr", "cpt_text", "cpt_replay",
           "sft", "sft_video"]  # fmt: skip


@pytest.fixture(scope="module")
def standin_data(tmp_path_factory, standins) -> str:
    """EVE_DATA_ROOT: every corpus of the four configs as packed rows (eve-make-shards --format
    interleaved, an OBELICS-style file with PNG images) with the stand-in LM's tokenizer, 16 media tokens."""
    from conftest import image_bytes

    from eve_ds.cli.make_shards import main as make_shards

    root = tmp_path_factory.mktemp("evlm_data")
    for i in range(3):
        (root / f"p{i}.png").write_bytes(image_bytes((60 * i, 90, 200), fmt="PNG"))
    docs = [{"texts": [None, f"w{3 + i} w7 w9"], "images": [f"p{i}.png", None]} for i in range(3)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    first = root / "evlm" / CORPORA[0]
    argv = ["--format", "interleaved", "--input", str(root / "docs.jsonl"), "--image-root", str(root),
            "--output", str(first), "--tokenizer", standins["EVLM_LM_PATH"], "--media-tokens", "16"]  # fmt: skip
    assert make_shards(argv) == 0
    for name in CORPORA[1:]:
        shutil.copytree(first, root / "evlm" / name)
    return str(root)


def dry_run(monkeypatch, capsys, env: dict, config: str, *overrides: str) -> tuple[int, dict]:
    from eve_ds.cli.pretrain import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(["--config", config, "--dry-run", "--json", "--world-size", "16", *overrides])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("config", STAGES)
def test_full_scale_stage_configs_dry_run_with_local_standins(monkeypatch, capsys, standins, standin_data,
                                                              tmp_path, config):  # fmt: skip
    env = {
        **standins,
        "EVLM_PT_RUN": str(tmp_path),
        "EVLM_CPT_RUN": str(tmp_path),
        "EVE_DATA_ROOT": standin_data,
    }
    rc, report = dry_run(monkeypatch, capsys, env, config, *STANDIN)
    plan = report["plan"]
    assert plan["lm"] == standins["EVLM_LM_PATH"] and standins["EVLM_VIT_PATH"] in plan["vision"]
    assert plan["batch"]["world"] == 16 and plan["image_tokens"] == 5
    sources = [p for p in report["problems"] if "model." in p]
    assert sources == [], sources  # the stand-ins pass every check of the LM and the tower
    if config == "evlm_14b_pt":  # the files and the shards are there: the run would start
        assert (rc, report["problems"]) == (0, [])
        assert [m["name"] for m in report["mixture"]] == ["captions", "interleaved"]
    else:  # the one problem left: an init_from directory without an EVLM checkpoint
        assert rc == 2 and len(report["problems"]) == 1
        assert (
            report["problems"][0].startswith("train.init_from=")
            and "no complete checkpoint" in report["problems"][0]
        )
    _, report = dry_run(monkeypatch, capsys, env, config, *STANDIN, "model.num_media_tokens=8")
    assert any(p.startswith("data.train[") and "16 media tokens per image but model.num_media_tokens=8" in p
               for p in report["problems"])  # fmt: skip


def test_full_scale_configs_carry_the_paper_recipe():
    pt, cpt, sft, moe = (load_config(c) for c in STAGES)
    assert (pt.optim.lr, pt.optim.min_lr, pt.train.max_steps, pt.optim.warmup_steps) == (
        6e-4,
        3e-5,
        125000,
        2000,
    )
    assert (cpt.optim.lr, cpt.optim.min_lr, cpt.train.max_steps, cpt.train.global_batch_size) == (
        1e-4,
        5e-5,
        50000,
        160,
    )
    assert (sft.optim.lr, sft.optim.min_lr, sft.train.max_steps, sft.optim.warmup_steps) == (
        5e-5,
        1e-6,
        12000,
        500,
    )
    assert (
        pt.train.global_batch_size == 480 and sft.train.global_batch_size == moe.train.global_batch_size == 16
    )
    assert (pt.optim.phase_start, pt.model.image_size, cpt.model.image_size) == (0.25, 224, 448)
    assert [c.model.stage for c in (pt, cpt, sft, moe)] == ["stage1", "stage2", "stage3", "stage3"]
    assert moe.model.moe and moe.model.top_k == 4 and moe.model.num_experts == 16 and moe.model.ep_size == 8
    for c in (pt, cpt, sft, moe):
        assert (c.optim.betas, c.optim.eps, c.optim.weight_decay, c.optim.grad_clip) == (
            [0.9, 0.999],
            1e-8,
            0.05,
            10.0,
        )
        assert c.train.grad_checkpointing and c.train.ds_config == "zero2_bf16"
    for name in STAGES:  # every recipe number says where it comes from
        for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
            key, _, value = line.split("#")[0].partition(":")
            parsed = yaml.safe_load(value) if value.strip() and not key.lstrip().startswith("-") else None
            numbers = parsed if isinstance(parsed, list) else [parsed]
            if numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
                assert "[paper]" in line or "[ours]" in line, f"{name}: {line.strip()}"


def test_dry_run_names_the_key_and_path_that_fail(monkeypatch, capsys, standins, tmp_path):
    rc, report = dry_run(monkeypatch, capsys, {**standins, "EVLM_LM_PATH": str(tmp_path / "nope")},
                         "evlm_14b_pt", *STANDIN)  # fmt: skip
    assert rc == 2
    assert f"model.lm_path='{tmp_path / 'nope'}': no such directory" in report["problems"][
        -2 if False else 0
    ] or any(
        p.startswith(f"model.lm_path='{tmp_path / 'nope'}': no such directory") for p in report["problems"]
    )
    # the real evlm_14b layout against the 64-wide stand-ins: the wrong LM and the wrong tower are named
    _, report = dry_run(monkeypatch, capsys, standins, "evlm_14b_pt", "model.image_size=28")
    problems = "\n".join(report["problems"])
    assert f"model.lm_layout.hidden_size=5120 but {standins['EVLM_LM_PATH']}/config.json has 64" in problems
    assert "model.vision_path=" in problems and "eva02_enormous_patch14_clip_224" in problems
    _, report = dry_run(monkeypatch, capsys, standins, "evlm_14b_pt", *STANDIN, "model.media_token_id=3")
    assert any(p.startswith("model.media_token_id=3: expected <|evlm_media|>'s id") and "in [150, 160)" in p
               for p in report["problems"])  # fmt: skip


def test_a_fixed_media_id_may_be_the_tokenizers_own_media_token(tmp_path):
    """The synthetic tasks' word-level vocabulary holds <|evlm_media|> at id 1: that id is not "in use"."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from eve_ds.models.evlm import get_config
    from eve_ds.train.evlm_preflight import media_token_problems

    vocab = {"<pad>": 0, "<|evlm_media|>": 1, "red": 2, "<unk>": 3}
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    for media_id, ok in ((1, True), (2, False), (4, True), (64, False)):
        cfg = get_config("evlm_tiny", lm_path=str(tmp_path), media_token_id=media_id)
        assert (media_token_problems(cfg, 64) == []) == ok, media_id


def test_the_phase_flag_survives_deepspeeds_expert_group_split(tmp_path, cache_dir):
    """With the late set inside the MoE, the expert groups DeepSpeed splits off keep the flag, so their
    multiplier is the phase's (the pitfall: a lambda list built before the split has the wrong length)."""
    args = small(cache_dir, **{"model.flavor": "evlm_tiny_moe", "optim.phase_params": '["*.xattn.ffn.*"]'})
    trainer = Trainer(load_config("evlm_tiny_synthetic", args), tmp_path)
    groups = trainer.engine.optimizer.optimizer.param_groups
    experts = [g for g in groups if g.get("moe")]
    assert experts and all(g["late"] for g in experts)
    assert len(trainer.scheduler.lr_lambdas) == len(groups)
    assert all(g["lr"] == 0.0 for g in groups if g["late"]) and any(g["lr"] > 0 for g in groups)
