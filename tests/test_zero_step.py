"""DeepSpeed's ZeRO-2 step with the sync-free norm and clip (`eve_ds.train.zero_step`): the same parameters
as DeepSpeed's own methods, bit for bit, with gradient clipping engaged and on a step with a NaN gradient;
no would-be host sync in the step; the opt-in foreach norm to float precision, with fewer ops. The norm of
all groups is one computation, the clip factor and the skip flag are computed once per step."""

from __future__ import annotations

import pytest
import torch
from conftest import free_port, make_batch

from eve_ds.bench.count import count_engine_step
from eve_ds.bench.throughput import BenchConfig, build_bench_engine, memory_batches, train_step
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig
from eve_ds.train.zero_step import make_step_sync_free

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_engine(deepspeed_methods: bool = False, foreach: bool = False):
    """eve_tiny MSM through the ZeRO-2 bf16 engine, clipping at a norm every step exceeds."""
    from eve_ds.train.distributed import init_distributed

    init_distributed("cpu", timeout_s=600)
    bc = BenchConfig(model="eve_tiny", ds_config="zero2_bf16")
    cfg, obj = get_config("eve_tiny"), ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    engine, dtype = build_bench_engine(bc, cfg, obj, 2)
    if deepspeed_methods:  # the instance's replacements removed: DeepSpeed's class methods again
        for name in ("get_grad_norm_direct", "unscale_and_clip_grads", "scaled_global_norm"):
            delattr(engine.optimizer, name)
    if foreach:
        make_step_sync_free(engine.optimizer, foreach_norm=True)
    engine.optimizer.clip_grad = 1e-3
    return engine, next(memory_batches(cfg, obj, 2, bc, dtype, num_batches=1))


def steps(engine, batch, n: int = 2) -> dict[str, torch.Tensor]:
    """n steps, then one whose gradients hold a NaN (skipped) -> the parameters and every step's norm."""
    norms = []
    for _ in range(n):
        train_step(engine, batch)
        norms.append(torch.as_tensor(engine.get_global_grad_norm()).clone())
    p = next(engine.module.parameters())
    hook = p.register_hook(lambda g: torch.full_like(g, float("nan")))
    try:
        train_step(engine, batch)
    finally:
        hook.remove()
    norms.append(torch.as_tensor(engine.get_global_grad_norm()).clone())
    return {
        "norms": torch.stack(norms),
        **{n: q.detach().clone() for n, q in engine.module.named_parameters()},
    }


def test_sync_free_norm_and_clip_are_deepspeeds_bit_for_bit():
    ours, theirs = steps(*tiny_engine()), steps(*tiny_engine(deepspeed_methods=True))
    assert not ours["norms"][-1].isfinite() and (ours["norms"][:-1] > 1e-3).all()  # clipped, then invalid
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_step_reads_nothing_and_the_foreach_norm_cuts_its_ops():
    engine, batch = tiny_engine()
    loop = count_engine_step(engine, batch)["step"]
    engine, batch = tiny_engine(deepspeed_methods=True)
    deepspeed = count_engine_step(engine, batch)["step"]
    engine, batch = tiny_engine(foreach=True)
    foreach = count_engine_step(engine, batch)["step"]
    assert sum(deepspeed.syncs.values()) == 8  # 4 groups x (bool() of the clip norm, torch.tensor(-1.0))
    assert not loop.syncs and not foreach.syncs
    tensors = sum(p.requires_grad for p in engine.module.parameters())
    assert foreach.compute_ops <= loop.compute_ops - 2 * tensors + 8
    # Per group only DeepSpeed's flatten, fp32 copy, bf16 copy back and the clip's mul_,
    # the fused AdamW (3 ops) and one sum of squares; the norm, clip factor and found_inf once per step.
    # (a later step: the first one also creates the Adam state). Profiler ranges are left out: torch wraps
    # `AdamW.step` in one too once any plain AdamW was built in the process, doubling them per group.
    groups = len(engine.optimizer.optimizer.param_groups)
    later = count_engine_step(engine, batch)["step"]
    ranges = later.ops["_record_function_enter_new"] + later.ops["_record_function_exit"]
    assert later.compute_ops - ranges <= 8 * groups + 45, (later.compute_ops, ranges)


def test_foreach_norm_matches_to_float_precision():
    ours, theirs = steps(*tiny_engine(foreach=True)), steps(*tiny_engine())
    torch.testing.assert_close(ours["norms"][:-1], theirs["norms"][:-1], rtol=1e-6, atol=0)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """Two clipped ZeRO-2 steps of eve_tiny (4 experts, ep_size=1: the expert groups' norms are averaged
    over an expert-data-parallel group of 2), with the replacements and with DeepSpeed's own methods."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    import deepspeed

    from eve_ds.objectives import PretrainingModel
    from eve_ds.train.config import load_config
    from eve_ds.train.engine import build_engine

    deepspeed.init_distributed(dist_backend="gloo")
    overrides = ["model.num_experts=4", "train.global_batch_size=4", "train.micro_batch_size=2"]
    cfg = load_config("eve_tiny_synthetic", [*overrides, "train.ds_config=zero2_cpu", "optim.grad_clip=1e-3"])
    result = {}
    for variant in ("ours", "deepspeed"):
        torch.manual_seed(0)
        model = PretrainingModel(cfg.model, cfg.objective)
        model.init_experts(0)
        engine, *_ = build_engine(cfg, model, 2, "cpu")
        assert any(engine.optimizer.is_moe_param_group)
        if variant == "deepspeed":
            for name in ("get_grad_norm_direct", "unscale_and_clip_grads", "scaled_global_norm"):
                delattr(engine.optimizer, name)
        norms = []
        for step in range(2):
            batch = make_batch(cfg.model, B=2, seed=100 + 10 * step + rank)
            out = engine(batch, torch.Generator().manual_seed(rank))
            engine.backward(out["loss"])
            engine.step()
            norms.append(torch.as_tensor(engine.get_global_grad_norm()).clone())
        result[variant] = {"norms": torch.stack(norms), **dict(model.state_dict())}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_norm_and_step_are_deepspeeds_bit_for_bit(tmp_path):
    """Data parallelism over 2 gloo processes: the one-vector norm (dense and expert groups, with their
    all-reduces) and the once-per-step clip give DeepSpeed's norms and parameters, bit for bit."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        ours, theirs = res["ours"], res["deepspeed"]
        assert (ours["norms"] > 1e-3).all()  # clipping engaged
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), rank
