"""GPU checks (skipped without CUDA): the fast paths equal their references in bf16 on EVE-Base-sized
shapes, and a short bf16 training run through the DeepSpeed engine learns."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import make_batch

from eve_ds.models.config import eve_base
from eve_ds.models.layers import Attention, Tokens
from eve_ds.models.moe import IMAGE, TEXT, ModalityMoE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_stacked_experts_equal_the_loop_in_bf16_at_base_size():
    cfg = eve_base()
    moes = {}
    for impl in ("loop", "stacked"):
        torch.manual_seed(0)
        moe = ModalityMoE(cfg.hidden_size, cfg.ffn_size, cfg.num_experts, 1, 2, False, 1.0, True, False, impl)
        moe.init_experts(0, seed=0, std=0.02)
        moes[impl] = moe.cuda().to(torch.bfloat16)
    moes["stacked"].load_state_dict(moes["loop"].state_dict())
    T = 64 * 237
    x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    modality = torch.where(torch.arange(T, device="cuda") % 237 < 197, IMAGE, TEXT)
    outs = {}
    for impl, moe in moes.items():
        xi = x.clone().requires_grad_()
        out, _, _ = moe(xi, modality)
        out.float().square().mean().backward()
        outs[impl] = (out.detach(), xi.grad, moe.local_experts[3].fc1.weight.grad)
    for a, b in zip(outs["stacked"], outs["loop"]):
        assert rel_err(a, b) < 1e-2
    assert outs["stacked"][0].abs().sum() > 0


def test_attention_with_bias_and_padding_matches_fp64_at_base_size():
    cfg = eve_base()
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        attn.rel_pos.relative_position_bias_table.normal_(0, 0.5)
        attn.q_bias.normal_(0, 0.1)
        attn.v_bias.normal_(0, 0.1)
    B, n_img, L = 16, 1 + cfg.num_patches, cfg.max_text_len
    pad = torch.zeros(B, n_img + L, dtype=torch.bool)
    pad[::2, -7:] = True  # half the captions end in 7 padding tokens
    x = torch.randn(B, n_img + L, cfg.hidden_size)
    ref = attn.double()(x.double(), Tokens(n_img, None, pad, ~pad))
    fast = attn.cuda().to(torch.bfloat16)
    out = fast(x.cuda().bfloat16(), Tokens(n_img, None, pad.cuda(), ~pad.cuda()))
    assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.parametrize("kernel", ["flex", "sdpa"])
def test_attention_kernels_gradients_match_fp64_at_base_size(kernel):
    """The compiled FlexAttention kernel (bias as score_mod, padding as block mask) and SDPA's, forward and
    gradients (bias table included) in fp32 against the reference in fp64 on the CPU, MIM-pass shapes."""
    cfg = dataclasses.replace(eve_base(), attention_kernel=kernel, rel_pos_bias=kernel == "flex")
    torch.manual_seed(0)
    attn = Attention(dataclasses.replace(cfg, attention_kernel="sdpa_bias"))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.05)
    fast = Attention(cfg)
    fast.load_state_dict(attn.state_dict())
    B, n_img, L = 8, 50, cfg.max_text_len
    ids = torch.stack([torch.randperm(cfg.num_patches)[: n_img - 1] for _ in range(B)])
    pad = torch.zeros(B, n_img + L, dtype=torch.bool)
    pad[::2, -7:] = True
    x, g = torch.randn(B, n_img + L, cfg.hidden_size), torch.randn(B, n_img + L, cfg.hidden_size)
    results = []
    for module, dev, dt in ((attn.double(), "cpu", torch.float64), (fast.cuda(), "cuda", torch.float32)):
        xi = x.to(dev, dt).requires_grad_()
        out = module(xi, Tokens(n_img, ids.to(dev), pad.to(dev), ~pad.to(dev)))
        (out * g.to(dev, dt)).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in module.parameters()])
    for ref, got in zip(*results):
        assert rel_err(got.cpu(), ref) < 1e-4


def test_bf16_training_through_the_engine_learns():
    """20 steps of EVE-Base MSM in bf16 with ZeRO-2 on one batch: the loss falls."""
    from eve_ds.data.config import DataConfig
    from eve_ds.data.transforms import batch_to_device
    from eve_ds.objectives import ObjectiveConfig, PretrainingModel
    from eve_ds.train.config import OptimConfig, RunConfig, TrainConfig
    from eve_ds.train.distributed import init_distributed
    from eve_ds.train.engine import build_engine

    init_distributed("cuda", timeout_s=300)
    cfg = dataclasses.replace(eve_base(), drop_path_rate=0.0)
    obj = ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    run = RunConfig(
        model=cfg,
        objective=obj,
        data=DataConfig(synthetic=True),
        optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
        train=TrainConfig(max_steps=20, global_batch_size=8, micro_batch_size=8, ds_config="zero2_bf16"),
    )
    torch.manual_seed(0)
    engine, _, _, _ = build_engine(run, PretrainingModel(cfg, obj), world_size=1, device="cuda")
    assert engine.bfloat16_enabled()
    batch = batch_to_device(make_batch(cfg, B=8, L=cfg.max_text_len), "cuda", torch.bfloat16)
    losses = []
    for _ in range(20):
        out = engine(batch, generator=torch.Generator(device="cuda").manual_seed(0))
        engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"]))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_blocks_train_as_eager_ones_and_cuda_graphs_replay(mode):
    """eve_tiny (grouped soft router) in bf16 through the ZeRO-2 engine, blocks compiled by Inductor
    (reduce-overhead: each block's kernels replayed as CUDA graphs): 4 steps on fixed-shape batches give
    the eager run's losses to bf16 precision."""
    from eve_ds.data.config import DataConfig
    from eve_ds.data.transforms import batch_to_device, pad_text
    from eve_ds.models.config import eve_tiny
    from eve_ds.objectives import ObjectiveConfig, PretrainingModel
    from eve_ds.train.config import OptimConfig, RunConfig, TrainConfig
    from eve_ds.train.distributed import init_distributed
    from eve_ds.train.engine import build_engine

    init_distributed("cuda", timeout_s=300)
    cfg = dataclasses.replace(eve_tiny(), moe_dispatch="grouped", drop_path_rate=0.0)
    obj = ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    batches = [
        batch_to_device(
            pad_text(make_batch(cfg, B=4, L=L, seed=i), cfg.max_text_len, cfg.pad_token_id),
            "cuda",
            torch.bfloat16,
        )
        for i, L in enumerate((12, 7, 10, 9))
    ]
    losses = {}
    for compile in (False, "blocks"):
        train = TrainConfig(max_steps=4, global_batch_size=4, micro_batch_size=4, ds_config="zero2_bf16",
                            compile=compile, compile_mode=mode)  # fmt: skip
        run = RunConfig(model=cfg, objective=obj, data=DataConfig(synthetic=True), train=train,
                        optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))  # fmt: skip
        torch.manual_seed(0)
        engine, _, _, _ = build_engine(run, PretrainingModel(cfg, obj), world_size=1, device="cuda")
        out = []
        for batch in batches:
            loss = engine(batch, generator=torch.Generator(device="cuda").manual_seed(0))["loss"]
            engine.backward(loss)
            engine.step()
            out.append(float(loss))
        losses[compile] = out
    torch.testing.assert_close(
        torch.tensor(losses["blocks"]), torch.tensor(losses[False]), rtol=2e-2, atol=2e-2
    )
