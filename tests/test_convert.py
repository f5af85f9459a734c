"""Checkpoint conversion: export, reshard, BEiT v2 import, Hugging Face loading, bad input.

The DeepSpeed checkpoints are real: eve_tiny trained by the trainer on two CPU processes (gloo) with
ep_size=2. Engines that resume from them run in this file's worker mode:

    torchrun --nproc_per_node 2 tests/test_convert.py worker RUN_DIR EP_SIZE OUT_PREFIX
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_batch

from eve_ds.cli.convert import main as convert_main
from eve_ds.convert import (
    export,
    import_beitv2,
    load_encoder,
    load_pretraining_model,
    reshard,
    resume_options,
)
from eve_ds.convert.beit import beitv2_to_eve, load_init_weights
from eve_ds.models.config import get_config
from eve_ds.models.eve import EVEModel
from eve_ds.objectives.base import PretrainingModel

REPO = Path(__file__).resolve().parents[1]
TAG = "step_00000002"
EXPERT = ".deepspeed_moe.experts.deepspeed_experts."


def run_overrides(cache: Path, ep_size: int, max_steps: int) -> list[str]:
    return [
        f"model.ep_size={ep_size}",
        f"train.max_steps={max_steps}",
        "train.checkpoint_every=2",
        f"data.cache_dir={cache}",
        "data.synthetic_num_train=256",
        "data.synthetic_num_val=32",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.eval_every=100",
        "train.eval_batches=1",
        "train.log_every=1",
        "optim.warmup_steps=1",
    ]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def fixed_batch() -> dict:
    return make_batch(get_config("eve_tiny"), B=2, L=12)


def msm_metrics(model) -> dict[str, float]:
    with torch.no_grad():
        out = model(fixed_batch(), generator=torch.Generator().manual_seed(1))
    return {k: float(out[k]) for k in ("loss", "mlm_loss", "mim_pixel_loss", "aux_loss", "mlm_acc")}


def load_dump(prefix: Path) -> dict:
    """Merge the per-rank dumps of a worker: {"weights"|"fp32"|"exp_avg"|"exp_avg_sq": {global name: t}}."""
    merged: dict = {}
    for r in range(2):
        d = torch.load(f"{prefix}_rank{r}.pt", weights_only=False)
        for k, v in d.items():
            merged.setdefault(k, {}).update(v) if isinstance(v, dict) else merged.setdefault(k, v)
    return merged


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory) -> Path:
    """Run dir of a 2-step eve_tiny pre-training on 2 CPU ranks with ep_size=2."""
    root = tmp_path_factory.mktemp("convert")
    run = root / "run_ep2"
    torchrun(
        "-m",
        "eve_ds.cli.pretrain",
        "--config",
        "eve_tiny_synthetic",
        "--run-dir",
        str(run),
        *run_overrides(root / "data", 2, 2),
    )
    assert (run / "checkpoints" / TAG / "layer_0_expert_3_mp_rank_00_model_states.pt").is_file()
    return run


@pytest.fixture(scope="module")
def resharded(ds_run) -> dict[str, Path]:
    root = ds_run.parent
    out = {"2to1": reshard(ds_run, root / "rs_ep1", 1, strict_optimizer=True).parents[1]}
    out["1to2"] = reshard(out["2to1"], root / "rs_ep2", 2, strict_optimizer=True).parents[1]
    return out


def _link_copy(src: Path, dst: Path) -> Path:
    """Copy a run dir, hard-linking the (never rewritten) .pt files."""
    shutil.copytree(
        src, dst, copy_function=lambda a, b: os.link(a, b) if a.endswith(".pt") else shutil.copy2(a, b)
    )
    return dst


@pytest.fixture(scope="module")
def source_dump(ds_run) -> dict:
    """Weights, optimizer state and MSM metrics of an ep_size=2 engine resumed from (a copy of) the source,
    which then trains one more step."""
    run = _link_copy(ds_run, ds_run.parent / "src_resumed")
    prefix = ds_run.parent / "dump_src"
    torchrun(__file__, "worker", str(run), "2", str(prefix))
    dump = load_dump(prefix)
    assert dump["step_after"] == 3 and (run / "checkpoints" / "step_00000003" / "eve_complete.json").is_file()
    return dump


# -- export ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_matches_deepspeed_metrics(ds_run, source_dump, tmp_path):
    dst = tmp_path / "export"
    assert convert_main(["export", str(ds_run), str(dst)]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["format"] == "eve-native" and cfg["model"]["num_experts"] == 4 and cfg["step"] == 2
    assert (dst / "vocab.txt").is_file() and not list(tmp_path.glob(".*tmp*"))
    model, cfg = load_pretraining_model(dst)
    assert model.model_cfg.ep_size == 1 and not model.training
    ref = source_dump["metrics"]
    got = msm_metrics(model)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-5), k
    # every weight, experts included, equals the engine's (gathered from the expert files)
    sd = model.state_dict()
    for name, t in source_dump["weights"].items():
        assert torch.equal(sd[name], t), name
    assert len(source_dump["weights"]) == len(sd)
    # from the DeepSpeed tag dir directly, and the encoder alone
    enc = load_encoder(ds_run / "checkpoints" / TAG)
    assert torch.equal(
        enc.blocks[3].ffn.moe.local_experts[3].fc1.weight, sd[f"encoder.blocks.3.ffn.moe{EXPERT}3.fc1.weight"]
    )
    # the classmethods users reach for first
    enc = EVEModel.from_pretrained(str(dst))
    assert not enc.training and torch.equal(
        enc.patch_embed.proj.weight, sd["encoder.patch_embed.proj.weight"]
    )
    full = PretrainingModel.from_pretrained(str(dst))
    assert msm_metrics(full) == got


@pytest.mark.slow
def test_eve_evaluate_accepts_export(ds_run, tmp_path, capsys):
    from eve_ds.cli import evaluate
    from eve_ds.data import resolve_val_spec
    from eve_ds.train.config import load_config

    cfg = load_config("eve_tiny_synthetic", run_overrides(ds_run.parent / "data", 2, 2))
    spec = resolve_val_spec(cfg.data, cfg.model.image_size)
    export(ds_run, tmp_path / "export")
    results = []
    for ckpt in (tmp_path / "export", ds_run):
        assert (
            evaluate.main(
                [
                    "--checkpoint",
                    str(ckpt),
                    "--data",
                    spec,
                    "--batch-size",
                    "8",
                    "--max-batches",
                    "2",
                    "--json",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["num_samples"] == 16
    for k in ("loss", "mlm_loss", "mim_pixel_loss"):
        assert results[0][k] == pytest.approx(results[1][k], abs=1e-5)


@pytest.mark.slow
def test_export_bf16(ds_run, tmp_path):
    from safetensors import safe_open

    export(ds_run, tmp_path / "bf16", dtype="bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("encoder.norm.weight").dtype == torch.bfloat16
    fp32, _ = load_pretraining_model(ds_run)
    bf16, _ = load_pretraining_model(tmp_path / "bf16")
    w = f"encoder.blocks.3.ffn.moe{EXPERT}2.fc2.weight"
    assert torch.equal(bf16.state_dict()[w], fp32.state_dict()[w].bfloat16().float())


# -- reshard -----------------------------------------------------------------------------------------------


def _optim(run: Path, rank: int) -> dict:
    f = run / "checkpoints" / TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return torch.load(f, weights_only=False)["optimizer_state_dict"]


@pytest.mark.slow
def test_reshard_roundtrip_is_exact(ds_run, resharded):
    info = json.loads((resharded["2to1"] / "checkpoints" / TAG / "reshard_info.json").read_text())
    assert info == {**info, "optimizer_state": "kept", "ep_size": 1, "world_size": 2, "source_ep_size": 2}
    ep1 = _optim(resharded["2to1"], 1)
    assert ep1["partition_count"] == [2, 2, 2, 2]  # experts now split over 2 expert-data-parallel ranks
    assert {g["name"] for g in ep1["base_optimizer_state"]["param_groups"][2:]} == {"ep_size_1"}
    for r in range(2):  # 2 -> 1 -> 2 gives back the source's shards bit for bit
        a, b = _optim(ds_run, r), _optim(resharded["1to2"], r)
        for g in range(4):
            assert torch.equal(
                a["single_partition_of_fp32_groups"][g], b["single_partition_of_fp32_groups"][g]
            )
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(
                    a["base_optimizer_state"]["state"][g][k], b["base_optimizer_state"]["state"][g][k]
                )
        assert a["group_paddings"] == b["group_paddings"]
        assert a["base_optimizer_state"]["param_groups"] == b["base_optimizer_state"]["param_groups"]


@pytest.mark.slow
def test_resume_from_resharded(resharded, source_dump):
    """A trainer with ep_size=1 resumes from the 2 -> 1 resharded checkpoint with its optimizer state:
    weights, fp32 master weights and Adam moments equal the ep_size=2 source engine's; then it trains on.
    (1 -> 2 gives back the source's files bit for bit, test_reshard_roundtrip_is_exact, and the source
    resumes and trains on in `source_dump`.)"""
    run = resharded["2to1"]
    prefix = run.parent / "dump_2to1"
    torchrun(__file__, "worker", str(run), "1", str(prefix))
    got = load_dump(prefix)
    for key in ("weights", "fp32", "exp_avg", "exp_avg_sq"):
        assert set(got[key]) == set(source_dump[key])
        for name, t in source_dump[key].items():
            assert torch.equal(got[key][name], t), (key, name)
    assert got["metrics"] == pytest.approx(source_dump["metrics"], abs=1e-5)
    assert got["step_after"] == 3 and got["resume_options"]["load_optimizer_states"]
    assert (run / "checkpoints" / "step_00000003" / "eve_complete.json").is_file()


# -- BEiT v2 -----------------------------------------------------------------------------------------------


def test_beitv2_import_reproduces_timm(tmp_path, capsys):
    from timm.models.beit import Beit

    torch.manual_seed(0)
    beit = Beit(
        img_size=64,
        patch_size=16,
        embed_dim=128,
        depth=4,
        num_heads=4,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
        init_values=0.1,
        num_classes=10,
    ).eval()
    with torch.no_grad():  # move the zero-initialised tables and biases away from zero
        for p in beit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": beit.state_dict()}, tmp_path / "beit.pth")
    from eve_ds.objectives import ObjectiveConfig, PretrainingModel

    cfg = get_config("eve_tiny", layer_scale_init=0.1)  # 3 hard-router blocks + 1 soft (4 experts)
    model = PretrainingModel(cfg, ObjectiveConfig()).eval()
    report = load_init_weights(model, tmp_path / "beit.pth")
    assert report["source"] == "beitv2" and sorted(report["ignored"]) == ["head.bias", "head.weight"]
    enc = model.encoder
    assert torch.equal(
        enc.blocks[0].attn.rel_pos.relative_position_index, beit.blocks[0].attn.relative_position_index
    )
    assert not enc.pos_embed.any() and not enc.type_embed.weight[0].any() and enc.type_embed.weight[1].any()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = beit.fc_norm(beit.forward_features(x))  # (B, 1 + P, D), per-token LayerNorm
        out = enc(image=x).hidden
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4
    # the same as an export dir: its encoder reproduces timm as well
    import_beitv2(tmp_path / "beit.pth", tmp_path / "init", model="eve_tiny", layer_scale_init=0.1)
    assert json.loads((tmp_path / "init" / "config.json").read_text())["init"]["source"] == "beitv2"
    with torch.no_grad():
        assert (load_encoder(tmp_path / "init")(image=x).hidden - ref).abs().max() < 1e-4
    # eve_tiny has no layer scale: BEiT's gammas have nowhere to go, and the message says so
    capsys.readouterr()
    _fails(
        ["import-beitv2", str(tmp_path / "beit.pth"), str(tmp_path / "o"), "--model", "eve_tiny"],
        capsys,
        "keys unknown to the model",
        "gamma_1",
    )


def test_beitv2_base_keys_map_completely():
    import timm

    from eve_ds.objectives import ObjectiveConfig, PretrainingModel

    beit = timm.create_model("beitv2_base_patch16_224", pretrained=False)
    cfg = get_config("eve_base")
    mapped, ignored = beitv2_to_eve(beit.state_dict(), cfg)
    with torch.device("meta"):
        own = PretrainingModel(cfg, ObjectiveConfig()).state_dict()
    assert sorted(ignored) == ["head.bias", "head.weight"]
    for k, v in mapped.items():
        assert k in own and own[k].shape == v.shape, k
    fresh = {k for k in own if k.startswith("encoder.") and k not in mapped}
    soft = [
        f"encoder.blocks.{i}.ffn.moe.deepspeed_moe.gate.{n}"
        for i in (10, 11)
        for n in ("wg.weight", "modality_bias")
    ]
    documented = {
        "encoder.word_embed.weight",
        "encoder.text_pos_embed",
        "encoder.type_embed.weight",
        "encoder.pos_embed",
        *soft,
    }
    assert fresh == documented
    assert sum(EXPERT in k for k in mapped) == 2 * 32 * 4  # 2 soft blocks x 32 experts x (fc1, fc2) x (w, b)


# -- Hugging Face ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_export_loads_with_automodel(ds_run, tmp_path, monkeypatch):
    dst = tmp_path / "hf"
    assert convert_main(["export", str(ds_run), str(dst), "--format", "hf"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["auto_map"]["AutoModel"] == "modeling_eve.EVEHFModel"
    assert cfg["auto_map"]["AutoConfig"] == "modeling_eve.EVEHFConfig"
    assert (dst / "modeling_eve.py").read_bytes() == (REPO / "eve_ds" / "hf" / "modeling_eve.py").read_bytes()
    assert "deepspeed" not in (dst / "modeling_eve.py").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(dst, trust_remote_code=True).eval()
    enc = load_encoder(ds_run)
    b = fixed_batch()
    with torch.no_grad():
        for kw in (
            {"image": b["image"], "text_ids": b["text_ids"], "text_mask": b["text_mask"]},
            {"image": b["image"]},
            {"text_ids": b["text_ids"], "text_mask": b["text_mask"]},
        ):
            ref = enc(**kw)
            out = hf(
                pixel_values=kw.get("image"), input_ids=kw.get("text_ids"), attention_mask=kw.get("text_mask")
            )
            assert out.n_image == ref.n_image
            assert (out.last_hidden_state - ref.hidden).abs().max() < 1e-5
    # a process without DeepSpeed, timm or eve_ds loads and runs it
    code = (
        "import sys; sys.modules.update(deepspeed=None, timm=None, eve_ds=None); import torch; "
        "from transformers import AutoModel; "
        f"m = AutoModel.from_pretrained({str(dst)!r}, trust_remote_code=True); "
        "print(m(pixel_values=torch.zeros(1, 3, 64, 64)).last_hidden_state.shape)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        cwd=tmp_path,
    )
    assert "torch.Size([1, 17, 128])" in proc.stdout, proc.stderr[-2000:]


def test_hf_relative_position_index_is_the_models():
    """The HF modeling file keeps its own copy of BEiT's index (it may not import timm): the same tensor."""
    from eve_ds.hf.modeling_eve import relative_position_index
    from eve_ds.models.layers import RelativePositionBias

    for grid in (1, 2, 4, 7, 14, 16):
        assert torch.equal(
            relative_position_index(grid), RelativePositionBias(grid, 1).relative_position_index
        )


# -- bad input ---------------------------------------------------------------------------------------------


def _copy_tag(run: Path, dst: Path) -> Path:
    """A hard-linked copy of the source tag dir (cheap), with its own JSON files."""
    tag = dst / TAG
    shutil.copytree(run / "checkpoints" / TAG, tag, copy_function=os.link)
    for f in tag.glob("*.json"):
        f.unlink()
        shutil.copy2(run / "checkpoints" / TAG / f.name, f)
    return tag


def _fails(argv: list[str], capsys, *needles: str) -> None:
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    dst = Path(argv[2])
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}.tmp*"))  # nothing half-written


@pytest.mark.slow
def test_bad_inputs(ds_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(["export", str(tmp_path / "empty"), str(tmp_path / "o1")], capsys, "is not a DeepSpeed checkpoint")
    _fails(["export", str(tmp_path / "nope"), str(tmp_path / "o2")], capsys, "no such file")

    tag = _copy_tag(ds_run, tmp_path / "missing")
    (tag / "layer_0_expert_3_mp_rank_00_model_states.pt").unlink()
    _fails(["export", str(tag), str(tmp_path / "o3")], capsys, "missing expert file layer_0_expert_3")
    _fails(["reshard", str(tag), str(tmp_path / "o3b"), "--ep-size", "1"], capsys, "layer_0_expert_3")

    tag = _copy_tag(ds_run, tmp_path / "mismatch")
    cfg = json.loads((tag / "eve_config.json").read_text())
    cfg["model"]["ffn_size"] = 256
    (tag / "eve_config.json").write_text(json.dumps(cfg))
    _fails(["export", str(tag), str(tmp_path / "o4")], capsys, "do not match the model config", "fc1.weight")

    _fails(
        ["reshard", str(ds_run), str(tmp_path / "o5"), "--ep-size", "3"],
        capsys,
        "--ep-size 3 does not divide num_experts=4",
    )
    _fails(
        ["import-beitv2", str(tmp_path / "nope.pth"), str(tmp_path / "o6")], capsys, "nope.pth: not a file"
    )
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    _fails(
        ["import-beitv2", str(tmp_path / "junk.pth"), str(tmp_path / "o7")],
        capsys,
        "junk.pth: cannot be read",
    )
    with pytest.raises(FileExistsError, match="already exists"):
        export(ds_run, tmp_path / "empty")


@pytest.mark.slow
def test_reshard_drops_optimizer_without_shards(ds_run, tmp_path, capsys):
    tag = _copy_tag(ds_run, tmp_path / "noopt")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _fails(
        ["reshard", str(tag), str(tmp_path / "strict"), "--ep-size", "1", "--strict-optimizer"],
        capsys,
        "optimizer state",
        "rank(s) [1] missing",
    )
    new_tag = reshard(tag, tmp_path / "dropped", 1)
    assert json.loads((new_tag / "reshard_info.json").read_text())["optimizer_state"] == "dropped"
    assert not list(new_tag.glob("*optim_states.pt"))
    assert resume_options(new_tag) == {
        "load_optimizer_states": False,
        "load_lr_scheduler_states": True,
        "load_module_only": False,
    }
    src_tag = ds_run / "checkpoints" / TAG
    assert resume_options(src_tag, world_size=2, ep_size=2)["load_optimizer_states"]
    assert not resume_options(src_tag, world_size=2, ep_size=1)["load_optimizer_states"]
    assert not resume_options(src_tag, world_size=4, ep_size=2)["load_optimizer_states"]


# -- worker (under torchrun) -------------------------------------------------------------------------------


def worker(run_dir: str, ep_size: int, prefix: str) -> None:
    """Resume a Trainer from `run_dir` with `ep_size`, dump what it loaded, then train one more step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from eve_ds.train.config import load_config
    from eve_ds.train.trainer import Trainer

    run = Path(run_dir)
    cache = Path(
        json.loads((run / "checkpoints" / TAG / "eve_config.json").read_text())["run"]["data"]["cache_dir"]
    )
    cfg = load_config("eve_tiny_synthetic", run_overrides(cache, ep_size, 3))
    tr = Trainer(cfg, run, allow_changes=True)  # one step more than the source ran
    opts = resume_options(tr.resume_from, world_size=tr.world, ep_size=ep_size)
    tr.engine.load_checkpoint(str(tr.resume_from.parent), tag=tr.resume_from.name, **opts)
    tr.engine.optimizer._lazy_init_hp_params_optimizer_state()  # what the first step would do: link moments
    ep_rank, n_local = tr.rank % ep_size, 4 // ep_size
    dump: dict = {"weights": {}, "fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in tr.engine.module.named_parameters():
        if EXPERT in name:
            head, rest = name.split(EXPERT)
            local, tail = rest.split(".", 1)
            name = f"{head}{EXPERT}{ep_rank * n_local + int(local)}.{tail}"
        dump["weights"][name] = p.detach().clone()
        if not p.requires_grad:  # a frozen table (pos_embed=sincos) has no fp32 master copy and no moments
            continue
        dump["fp32"][name] = safe_get_full_fp32_param(p)
        for key in ("exp_avg", "exp_avg_sq"):
            dump[key][name] = safe_get_full_optimizer_state(p, key)
    tr.engine.module.eval()
    dump["metrics"] = msm_metrics(tr.engine.module)
    dump["resume_options"] = opts
    tr.train()
    dump["step_after"] = tr.state["step"]
    torch.save(dump, f"{prefix}_rank{tr.rank}.pt")


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
