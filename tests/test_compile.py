"""train.compile=blocks (eve_ds/train/compile.py): which blocks compile, fullgraph; three ZeRO-2 bf16 training
steps of eve_tiny (grouped soft router, drop path on) with captions of varying lengths padded to
max_text_len compile once and never again (dynamo's error_on_recompile from the second step on) and equal
eager training to float precision; unpadded lengths do recompile (so the check can fail).

The backend is aot_eager: dynamo and AOTAutograd build the same forward and backward graphs that Inductor
would compile (and break, guard and recompile the same way), run by eager kernels; Inductor needs minutes
per graph on a shared CPU (about 9 min for this model's 8 graphs on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_batch
from torch._dynamo.utils import counters

from eve_ds.bench.count import block_graph_breaks
from eve_ds.bench.throughput import BenchConfig, build_bench_engine, train_step
from eve_ds.data.transforms import batch_to_device, pad_text
from eve_ds.models.config import eve_tiny
from eve_ds.models.eve import EVEModel
from eve_ds.objectives import ObjectiveConfig
from eve_ds.train.compile import compile_blocks
from eve_ds.train.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")
OVERRIDES = ["moe_dispatch=grouped", "drop_path_rate=0.1"]
LENGTHS = (12, 7, 10)  # the longest caption of each batch: the collate pads to it


def engine(compile: str):
    from eve_ds.train.distributed import init_distributed

    init_distributed("cpu", timeout_s=600)
    bc = BenchConfig(
        model="eve_tiny",
        ds_config="zero2_bf16",
        model_overrides=OVERRIDES,
        compile=compile,
        compile_backend="aot_eager",
    )
    obj = ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    return build_bench_engine(bc, bc.model_config(), obj, 3)[0]


def batches(pad: bool) -> list[dict]:
    cfg = eve_tiny()
    out = []
    for seed, L in enumerate(LENGTHS):
        b = make_batch(cfg, B=3, L=L, seed=seed)
        out.append(
            batch_to_device(
                pad_text(b, cfg.max_text_len, cfg.pad_token_id) if pad else b, "cpu", torch.bfloat16
            )
        )
    return out


def train(eng, data: list[dict], strict_after_first: bool, monkeypatch) -> dict[str, torch.Tensor]:
    """One step per batch (the same RNG stream for both runs) -> losses and the final parameters."""
    torch.manual_seed(0)
    losses = []
    for i, batch in enumerate(data):
        if i == 1 and strict_after_first:
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
            graphs = counters["stats"]["unique_graphs"]
        losses.append(train_step(eng, batch)["loss"].detach().float())
    if strict_after_first:
        assert counters["stats"]["unique_graphs"] == graphs
    return {"losses": torch.stack(losses)} | {n: p.detach().float() for n, p in eng.module.named_parameters()}


def test_compiled_blocks_train_as_eager_with_no_recompile(monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    data = batches(pad=True)
    compiled = train(engine("blocks"), data, True, monkeypatch)
    # every block of both passes (MLM: full image + text, MIM: kept patches + text) is one graph
    assert counters["stats"]["unique_graphs"] >= 2 * 2 and not counters["graph_break"]
    eager = train(engine("off"), data, False, monkeypatch)
    assert eager.keys() == compiled.keys()
    assert (eager["losses"][1:] != eager["losses"][0]).all()
    for name, ref in eager.items():
        err = float((compiled[name] - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        assert err < 2e-2, f"{name}: {err:.2e}"  # bf16 parameters: one rounding step at most


@pytest.mark.slow
def test_unpadded_lengths_recompile(monkeypatch):
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.RecompileError):
        train(engine("blocks"), batches(pad=False), True, monkeypatch)
    torch._dynamo.reset()


def test_which_blocks_compile():
    def compiled(dtype: torch.dtype, **overrides) -> dict:
        model = EVEModel(eve_tiny(num_layers=3, **overrides)).to(dtype)
        return compile_blocks(model, "aot_eager")

    assert compiled(torch.bfloat16) == {"compiled": [0, 1], "eager": [2]}  # DeepSpeed's MoE: int(C)
    assert compiled(torch.bfloat16, moe_dispatch="grouped") == {"compiled": [0, 1, 2], "eager": []}
    # torch 2.14 traces torch._grouped_mm in bf16 / fp16 only
    assert compiled(torch.float32, moe_dispatch="grouped") == {"compiled": [0, 1], "eager": [2]}
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel", ["sdpa_bias", "sdpa", "flex"])
def test_every_attention_kernel_is_one_graph_in_a_block(kernel):
    """A grouped soft-router block with the relative position bias and padded keys, for each kernel
    (FlexAttention and its block mask inside the graph)."""
    cfg = eve_tiny(moe_dispatch="grouped", attention_kernel=kernel)
    model = EVEModel(cfg).to(torch.bfloat16)
    b = make_batch(cfg, B=2, L=6)
    blocks = block_graph_breaks(model, lambda: model(b["image"].bfloat16(), b["text_ids"], b["text_mask"]))
    assert {k: (v["graphs"], v["breaks"]) for k, v in blocks.items()} == {"hard": (1, 0), "soft": (1, 0)}


def test_pad_text_pads_ids_and_mask_only_when_shorter():
    b = make_batch(eve_tiny(), B=2, L=6)
    padded = pad_text(b, 9, pad_id=0)
    assert padded["text_ids"].shape == padded["text_mask"].shape == (2, 9)
    assert torch.equal(padded["text_ids"][:, :6], b["text_ids"]) and not padded["text_mask"][:, 6:].any()
    assert pad_text(padded, 9, 0) is padded


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.compile=graph"], "train.compile.*false or blocks"),
        (["train.compile=true"], "train.compile.*false or blocks"),
        (["train.compile=blocks", "train.grad_checkpointing=true"], "grad_checkpointing"),
        (["train.compile_backend=eager"], "train.compile_backend.*inductor, aot_eager"),
        (["train.compile_mode=fast"], "train.compile_mode.*default, reduce-overhead"),
        (["train.compile_backend=aot_eager", "train.compile_mode=reduce-overhead"], "modes are Inductor's"),
    ],
)
def test_compile_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("eve_tiny_synthetic", overrides)


@pytest.mark.slow
def test_a_compiled_run_trains_as_an_eager_one(tmp_path):
    """The trainer with train.compile=blocks on the synthetic corpus (captions of varying lengths, padded to
    max_text_len by the trainer): the same losses and gradient norms as the eager run with the same padding
    (train.static_text_len: the MLM / MIM masks are drawn over the padded shape), step by step."""
    from eve_ds.cli.pretrain import main

    overrides = {
        "data.cache_dir": tmp_path / "cache",
        "data.synthetic_num_train": 256,
        "data.synthetic_num_val": 16,
        "data.num_workers": 1,
        "train.micro_batch_size": 8,
        "train.global_batch_size": 8,
        "train.log_every": 1,
        "train.eval_batches": 1,
        "train.max_steps": 4,
        "train.compile_backend": "aot_eager",
        "train.static_text_len": True,
    }
    records = {}
    for mode in ("blocks", "false"):
        run = tmp_path / mode
        args = [f"{k}={v}" for k, v in {**overrides, "train.compile": mode}.items()]
        assert main(["--run-dir", str(run), *args]) == 0
        lines = (run / "metrics.jsonl").read_text().splitlines()
        train_records = [r for r in map(json.loads, lines) if "grad_norm" in r]
        records[mode] = torch.tensor([[r["loss"], r["grad_norm"]] for r in train_records])
    assert records["false"].shape == (4, 2)
    torch.testing.assert_close(records["blocks"], records["false"], rtol=1e-5, atol=0)
