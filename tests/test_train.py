"""The trainer: config, schedule, DeepSpeed config merge, end-to-end runs, exact resume, signals, faults.

Runs go through the real DeepSpeed engine (CPU accelerator, gloo) on a small synthetic corpus.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port

from eve_ds.train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eve_cache")


def small(cache_dir: Path, **extra) -> list[str]:
    """Overrides for a seconds-long tiny run on a small synthetic corpus shared by the module."""
    base = {
        "data.cache_dir": str(cache_dir),
        "data.synthetic_num_train": 512,
        "data.synthetic_num_val": 64,
        "data.num_workers": 1,
        "train.micro_batch_size": 8,
        "train.global_batch_size": 8,
        "train.log_every": 1,
        "train.eval_batches": 2,
        "optim.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def env(one_thread: bool = True) -> dict:
    """The environment of a fresh process: no distributed variables left by an in-process run.

    One OpenMP thread by default, for speed (tiny models on a shared 2-core machine); not for
    reproducibility: the tests that need bitwise equal runs set train.deterministic=true and one_thread=False,
    so that what they check is the trainer's own deterministic mode.
    """
    e = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    if one_thread:
        e.setdefault("OMP_NUM_THREADS", "1")
    else:
        e.pop("OMP_NUM_THREADS", None)
    return e


def run_train(
    run_dir: Path, overrides: list[str], nproc: int = 1, one_thread: bool = True, **kw
) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "eve_ds.cli.pretrain"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "-m",
            "eve_ds.cli.pretrain",
        ]
    cmd += ["--run-dir", str(run_dir), *overrides]
    return subprocess.run(cmd, env=env(one_thread), capture_output=True, text=True, timeout=600, **kw)


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "eve_complete.json").exists())


# -- config -----------------------------------------------------------------------------------------------


def test_packaged_configs_have_the_paper_recipe():
    base, large = load_config("eve_base_4m", _data_env()), load_config("eve_large_16m", _data_env())
    for cfg in (base, large):
        assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.weight_decay == 0.05
        assert cfg.optim.warmup_steps == 10_000 and cfg.optim.schedule == "cosine"
        assert cfg.train.global_batch_size == 2048
        assert cfg.model.image_size == 224 and cfg.model.patch_size == 16
        assert cfg.objective.image_mask_ratio == 0.75 and cfg.objective.text_mask_ratio == 0.5
        assert cfg.objective.aux_loss_weight == 0.001
        assert cfg.objective.objectives == ["mlm", "mim_pixel"]
        assert cfg.model.num_experts == 32 and cfg.model.top_k == 2 and not cfg.model.drop_tokens
    assert (base.optim.lr, base.train.max_steps, base.model.soft_blocks) == (5e-4, 480_000, [10, 11])
    assert (large.optim.lr, large.train.max_steps, large.model.soft_blocks) == (2e-4, 280_000, [21, 22, 23])
    assert "cc12m" in [c.name for c in large.data.train]


def _data_env() -> list[str]:
    os.environ.setdefault("EVE_DATA_ROOT", "/data")
    return []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1e-3", "unknown config key 'optim.lrr'; did you mean optim.lr?"),
        ("trian.max_steps=3", "unknown config key 'trian'; did you mean train?"),
        ("train.max_steps=abc", "train.max_steps='abc' is invalid: expected an integer"),
        ("optim.schedule=step", "optim.schedule='step' is invalid: expected one of cosine, linear, constant"),
        ("model.ep_size=3", "model.ep_size=3 is invalid: expected a divisor of model.num_experts=4"),
        ("model.flavor=eve_huge", "model.flavor='eve_huge' is invalid"),
        ("wandb.mode=maybe", "wandb.mode='maybe' is invalid: expected one of online, offline, disabled"),
        ("data.hflip=2", "data.hflip=2.0 is invalid: expected a probability in [0, 1]"),
        ("objective.objectives=[mlm,foo]", "unknown ['foo']"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("eve_tiny_synthetic", [override])
    assert message in str(err.value)


def test_overrides_and_flavor_defaults():
    cfg = load_config("eve_tiny_synthetic", ["model.ep_size=2", "optim.lr=5e-4", "train.stop_after=7"])
    assert cfg.model.ep_size == 2 and cfg.optim.lr == 5e-4 and cfg.train.stop_after == 7
    assert cfg.model.hidden_size == 128 and cfg.model.soft_blocks == [3]  # eve_tiny flavor defaults


def test_schedule_warmup_then_cosine_to_min_lr():
    from eve_ds.train.engine import lr_lambda

    cfg = load_config(
        "eve_tiny_synthetic",
        ["optim.warmup_steps=10", "train.max_steps=110", "optim.lr=1e-3", "optim.min_lr=1e-5"],
    )
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.01)  # min_lr / lr
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


class FixedTask:
    """What `resolve` reads of a prepared task."""

    def __init__(self, objectives=(), n: int | None = None, options: dict | None = None) -> None:
        self.objectives, self.n, self.options = objectives, n, options or {}

    def objective_options(self) -> dict:
        return self.options

    def num_examples(self) -> int | None:
        return self.n


def test_ds_config_merge_derives_accumulation_and_keeps_ds_files_to_zero_and_precision(tmp_path):
    from eve_ds.train.config import resolve
    from eve_ds.train.engine import build_ds_config, load_ds_file

    def merged(cfg, world: int) -> dict:
        return build_ds_config(resolve(cfg, world, FixedTask()), world_size=world)

    cfg = load_config("eve_base_4m", _data_env())
    ds = merged(cfg, 16)
    assert ds["gradient_accumulation_steps"] == 2048 // (128 * 16)
    assert ds["train_batch_size"] == 2048 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["reduce_scatter"]
    # No per-tensor overflow check and no throughput-timer syncs (tests/test_count.py counts the effect).
    assert ds["bf16"]["check_grad_overflow"] is False and ds["timers"]["throughput"]["enabled"] is False
    # More GPUs than the micro-batch allows (8 nodes x 8 for EVE-Large): the micro-batch shrinks, the
    # global batch stays 2048.
    wide = merged(load_config("eve_large_4m", _data_env()), 64)
    assert (wide["train_micro_batch_size_per_gpu"], wide["gradient_accumulation_steps"]) == (32, 1)
    odd = merged(load_config("eve_base_4m", ["train.micro_batch_size=100"]), 16)
    assert (odd["train_micro_batch_size_per_gpu"], odd["gradient_accumulation_steps"]) == (64, 2)
    with pytest.raises(ConfigError, match="does not split over 3 ranks"):
        merged(load_config("eve_base_4m", _data_env()), 3)
    with pytest.raises(ConfigError, match="resolve the config"):  # the merge derives nothing itself
        build_ds_config(load_config("eve_base_4m", ["train.micro_batch_size=100"]), world_size=16)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    with pytest.raises(ConfigError, match="belong in the run config"):
        load_ds_file(str(bad))


def test_resolve_derives_every_value_into_a_new_config_and_leaves_the_loaded_one_alone():
    from eve_ds.train.config import resolve

    cfg = load_config(
        "vqa_tiny_synthetic",
        ["train.max_steps=null", "train.micro_batch_size=5", "optim.warmup_ratio=0.1", "task.epochs=2"],
    )
    before = cfg.to_dict()
    task = FixedTask(("vqa",), n=1000, options={"vqa": {"num_answers": 17}})
    run = resolve(cfg, 2, task)
    assert cfg.to_dict() == before
    gb = cfg.train.global_batch_size
    micro = max(d for d in range(1, 6) if (gb // 2) % d == 0)
    assert (run.train.micro_batch_size, run.train.grad_accum_steps) == (micro, gb // (2 * micro))
    assert run.train.max_steps == math.ceil(2 * 1000 / gb)
    assert run.optim.warmup_steps == round(0.1 * run.train.max_steps)
    assert run.objective.heads == {"vqa": {"num_answers": 17}}
    with pytest.raises(ConfigError, match=r"set objective.objectives=\[nlvr2\]"):
        resolve(cfg, 2, FixedTask(("nlvr2",), n=1000))


class ReadsTheImage(torch.nn.Module):
    """A stand-in model with known answers for `evaluate`: sample i of the hand-made batches below carries
    its index in its image (every pixel i * 20) and in its text (token 2000 + i). MLM targets are the
    tokens after those (an attribute colour word, an attribute size word, a plain word); the prediction is
    right when the image belongs to the text, except that it never gets the size word right.
    Reported loss: the sample index, so the mean over samples is known too."""

    def __init__(self, size_id: int) -> None:
        super().__init__()
        self.size_id = size_id

    def forward(self, batch: dict, generator=None) -> dict:
        pixel = batch["image"][:, 0, 0, 0] * 0.229 + 0.485  # un-normalise channel 0: x / 255
        from_image = torch.round(pixel * 255 / 20).long()
        from_text = batch["text_ids"][:, 1] - 2000
        target = batch["text_ids"][:, 2:5]  # (B, 3)
        right = (from_image == from_text)[:, None] & (target != self.size_id)
        pred = torch.where(right, target, torch.zeros_like(target))
        return {
            "loss": from_text.float().mean(),
            "mlm_acc": right.float().mean(),
            "mlm_pred": pred.reshape(-1),
            "mlm_target": target.reshape(-1),
        }


def test_evaluate_counts_attribute_words_right():
    """Known answers: attribute accuracy 1/2 (colour 1, size 0) with the right images, 0 with images
    shuffled across the batch; 2 attribute words per sample; sample-weighted means over unequal batches."""
    from eve_ds.data import load_tokenizer
    from eve_ds.data.synthetic_probe import AttributeProbe
    from eve_ds.tasks.pretraining import evaluate

    tok = load_tokenizer()
    red, blue, small = tok.convert_tokens_to_ids(["red", "blue", "small"])

    def batch(indices: list[int]) -> dict:
        ids = torch.tensor([[101, 2000 + i, red if i % 2 else blue, small, 3000, 102] for i in indices])
        image = torch.tensor(indices, dtype=torch.uint8).mul(20).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
        return {"image": image.contiguous(), "text_ids": ids, "text_mask": torch.ones_like(ids)}

    loader = [batch([0, 1, 2]), batch([3, 4])]
    attr = {"colour": [red, blue], "size": [small]}
    m = evaluate(ReadsTheImage(small), loader, device="cpu", probe=AttributeProbe(attr, "cpu"))
    assert m["num_samples"] == 5
    assert m["loss"] == pytest.approx(2.0)  # (0 + 1 + 2 + 3 + 4) / 5, not the mean of the batch means
    assert m["mlm_acc"] == pytest.approx(2 / 3)
    assert (m["attr_words"], m["attr_words/colour"], m["attr_words/size"]) == (10, 5, 5)
    assert (m["attr_word_acc"], m["attr_word_acc/colour"], m["attr_word_acc/size"]) == (0.5, 1.0, 0.0)
    assert m["attr_word_acc_shuffled_images"] == 0.0 and m["attr_word_acc_shuffled_images/colour"] == 0.0
    assert evaluate(ReadsTheImage(small), loader, device="cpu", max_batches=1)["num_samples"] == 3


def test_default_run_trains_validates_and_checkpoints(tmp_path, cache_dir):
    from eve_ds.cli.pretrain import main

    run = tmp_path / "run"
    overrides = small(
        cache_dir,
        **{
            "train.max_steps": 4,
            "train.checkpoint_every": 2,
            "train.eval_every": 2,
            "train.micro_batch_size": 6,  # fitted to 4: the largest divisor of 8 per rank up to 6
            "optim.warmup_ratio": 0.5,
        },
    )
    assert main(["--run-dir", str(run), *overrides]) == 0
    # config.yaml is what ran: the derived values, not the ones asked for.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["micro_batch_size"], saved["train"]["grad_accum_steps"]) == (4, 2)
    assert (saved["train"]["max_steps"], saved["optim"]["warmup_steps"]) == (4, 2)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for k in ("loss", "mlm_loss", "mim_pixel_loss", "aux_loss", "lr", "grad_norm", "samples_per_s"):
            assert math.isfinite(r[k]), k
        assert r["loss"] == pytest.approx(r["mlm_loss"] + r["mim_pixel_loss"] + r["aux_loss"], rel=1e-5)
        assert sum(r["expert_load/block3/image"]) == pytest.approx(1.0)
    assert any("val/mlm_loss" in r for r in records)
    final = json.loads((run / "final_metrics.json").read_text())
    for key in ("attr_word_acc", "attr_word_acc_shuffled_images"):  # fractions of counted words
        hits = final[key] * final["attr_words"]
        assert hits == pytest.approx(round(hits), abs=1e-6) and 0 <= round(hits) <= final["attr_words"]
    per_category = [final[f"attr_words/{c}"] for c in ("colour", "shape", "size", "relation")]
    assert sum(per_category) == final["attr_words"] and min(per_category) > 0
    hits = sum(
        final[f"attr_word_acc/{c}"] * final[f"attr_words/{c}"]
        for c in ("colour", "shape", "size", "relation")
    )
    assert hits == pytest.approx(final["attr_word_acc"] * final["attr_words"])
    assert complete_steps(run) == [2, 4]
    assert (run / "config.yaml").exists() and json.loads((run / "ds_config.json").read_text())[
        "train_batch_size"
    ] == 8
    # Running again with the same run dir resumes and finds the run complete.
    assert main(["--run-dir", str(run), *overrides]) == 0
    assert len(train_losses(run)) == 4


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, cache_dir):
    overrides = small(
        cache_dir,
        **{
            "train.max_steps": 6,
            "train.checkpoint_every": 3,
            "train.eval_every": 100,
            "data.num_workers": 2,
            "train.deterministic": "true",  # bitwise: one intra-op thread, deterministic kernels
        },
    )
    ref = tmp_path / "ref"
    assert run_train(ref, overrides, one_thread=False).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eve_ds.cli.pretrain",
            "--run-dir",
            str(run),
            *overrides,
            "train.stop_after=5",
        ],
        env=env(one_thread=False),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while 3 not in complete_steps(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 in complete_steps(run)
    assert run_train(run, overrides, one_thread=False).returncode == 0
    assert train_losses(run) == train_losses(ref)  # same data, masks and dropout: bitwise
    assert len(train_losses(ref)) == 6


def test_sigterm_saves_and_exits_with_the_preemption_code(tmp_path, cache_dir):
    from eve_ds.train import EXIT_PREEMPTED

    run = tmp_path / "run"
    overrides = small(
        cache_dir, **{"train.max_steps": 10_000, "train.checkpoint_every": 10_000, "train.eval_every": 10_000}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "eve_ds.cli.pretrain", "--run-dir", str(run), *overrides],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(_lines(run / "metrics.jsonl")) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    steps = complete_steps(run)
    assert len(steps) == 1 and steps[0] >= 2
    assert (
        json.loads((run / "checkpoints" / f"step_{steps[0]:08d}" / "trainer_state.json").read_text())["step"]
        == steps[0]
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_an_interrupted_save_is_never_resumed_from(tmp_path, cache_dir):
    """A tag dir without its completion marker (what a kill during a save leaves) is skipped and removed."""
    run = tmp_path / "run"
    overrides = small(
        cache_dir, **{"train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 100}
    )
    assert run_train(run, [*overrides, "train.stop_after=2"]).returncode == 0
    partial = run / "checkpoints" / "step_00000003"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02truncated")
    (run / "checkpoints" / "latest").write_text("step_00000003")  # even a pointer to it is not trusted
    result = run_train(run, overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr and "step_00000002" in result.stderr
    assert complete_steps(run) == [2, 4] and not partial.exists()


@pytest.mark.parametrize("check", ["device", "host"])
def test_nonfinite_losses_stop_the_run_naming_the_last_good_checkpoint(tmp_path, cache_dir, check):
    """train.nonfinite_check=device (the default) reads the losses' finiteness once per log interval: the
    non-finite micro-batches are counted in the metrics (skipped_nonfinite) and their steps' updates
    skipped on the device (skipped_updates); host replaces each such micro-batch by the next one."""
    run = tmp_path / "run"
    overrides = small(
        cache_dir,
        **{
            "train.max_steps": 40,
            "train.checkpoint_every": 2,
            "train.eval_every": 100,
            "train.max_nonfinite_steps": 2,
            "train.nonfinite_check": check,
            "optim.lr": 1e30,
            "optim.warmup_steps": 0,
            "optim.grad_clip": 0.0,
        },
    )
    result = run_train(run, overrides)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite losses in a row" in result.stderr
    assert "last good checkpoint" in result.stderr
    if check == "device":
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if "skipped_nonfinite" in r][-1]
        assert last["skipped_nonfinite"] == 1 and last["skipped_updates"] >= 1


def test_the_device_side_loss_check_trains_bit_for_bit_as_the_host_one(tmp_path, cache_dir):
    """Finite losses: the device check (loss x 1.0 into the backward, no host read) changes nothing."""
    overrides = small(
        cache_dir, **{"train.max_steps": 3, "train.eval_every": 100, "train.deterministic": "true"}
    )
    losses = {}
    for check in ("device", "host"):
        result = run_train(tmp_path / check, [*overrides, f"train.nonfinite_check={check}"], one_thread=False)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[check] = train_losses(tmp_path / check)
    assert len(losses["device"]) == 3 and losses["device"] == losses["host"]


@pytest.mark.slow
def test_two_ranks_zero2_expert_parallel_train_checkpoint_and_resume(tmp_path, cache_dir):
    """Two ranks, ep_size=2: stopped after step 2 and resumed, the run has the per-step losses and the final
    validation metrics of an uninterrupted two-rank run, bit for bit (train.deterministic=true)."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    overrides = small(
        cache_dir,
        **{
            "model.ep_size": 2,
            "train.global_batch_size": 16,
            "train.max_steps": 4,
            "train.checkpoint_every": 2,
            "train.eval_every": 2,
            "train.deterministic": "true",
        },
    )
    uninterrupted = run_train(ref, overrides, nproc=2, one_thread=False)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    first = run_train(run, [*overrides, "train.stop_after=2"], nproc=2, one_thread=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert complete_steps(run) == [2]
    tag = run / "checkpoints" / "step_00000002"
    experts = sorted(p.name for p in tag.glob("layer_*_expert_*_model_states.pt"))
    assert len(experts) == 4  # all 4 global experts saved, two from each expert-parallel rank
    assert len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert "expert-parallel 2 x expert-data-parallel 1" in first.stderr
    second = run_train(run, overrides, nproc=2, one_thread=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step_00000002" in second.stderr
    losses, ref_losses = train_losses(run), train_losses(ref)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses == ref_losses  # bitwise, steps 3 and 4 after the resume included
    assert len(set(losses.values())) == 4  # the losses move: equal lists are not equal by accident
    final, ref_final = (json.loads((r / "final_metrics.json").read_text()) for r in (run, ref))
    assert final["step"] == 4 and math.isfinite(final["mlm_loss"])
    for key in ("mlm_loss", "mim_pixel_loss", "attr_word_acc", "train_loss"):
        assert final[key] == ref_final[key], key


@pytest.mark.slow
def test_a_dead_rank_makes_the_other_exit_instead_of_hanging(tmp_path, cache_dir):
    """Two ranks started by hand (no torchrun agent to clean up): SIGKILL one mid-run; the survivor must
    fail with an error well within train.dist_timeout_s, not wait forever in a collective."""
    run = tmp_path / "run"
    overrides = small(
        cache_dir,
        **{
            "model.ep_size": 2,
            "train.global_batch_size": 16,
            "train.max_steps": 10_000,
            "train.checkpoint_every": 10_000,
            "train.eval_every": 10_000,
            "train.dist_timeout_s": 60,
        },
    )
    port = str(free_port())
    procs = []
    for rank in range(2):
        e = dict(
            env(),
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "eve_ds.cli.pretrain", "--run-dir", str(run), *overrides],
                env=e,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.time() + 300
    while time.time() < deadline and len(_lines(run / "metrics.jsonl")) < 2:
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode not in (0, None)
    assert "Error" in err  # an exception, not a silent exit
    assert time.time() - killed_at < 90
