"""DeepSpeed's ZeRO-2 step with the sync-free norm and clip (`eve_ds.train.zero_step`): the same parameters
as DeepSpeed's own methods, bit for bit, with gradient clipping engaged and on a step with a NaN gradient;
no would-be host sync in the step; the opt-in foreach norm to float precision, with fewer ops. The norm of
all groups is one computation, the clip factor and the skip flag are computed once per step."""

from __future__ import annotations

import pytest
import torch

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
    # Per group only DeepSpeed's flatten, fp32 copy, bf16 copy back and profiler ranges, the clip's mul_,
    # the fused AdamW (3 ops) and one sum of squares; the norm, clip factor and found_inf once per step.
    # (a later step: the first one also creates the Adam state)
    groups = len(engine.optimizer.optimizer.param_groups)
    later = count_engine_step(engine, batch)["step"]
    assert later.compute_ops <= 10 * groups + 45, later.compute_ops


def test_foreach_norm_matches_to_float_precision():
    ours, theirs = steps(*tiny_engine(foreach=True)), steps(*tiny_engine())
    torch.testing.assert_close(ours["norms"][:-1], theirs["norms"][:-1], rtol=1e-6, atol=0)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
