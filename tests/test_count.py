"""The counting profiler (`eve_ds.bench.count`, `eve-profile --count`): it finds sync sites at their
file:line (forward, backward, DeepSpeed's synchronize), counts deterministically, keeps the phases apart —
and regression guards on eve_tiny's would-be host syncs (forward, optimizer step) and step ops."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

from eve_ds.bench.count import count_call, count_engine_step
from eve_ds.bench.throughput import BenchConfig, build_bench_engine, memory_batches, train_step
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig

pytestmark = pytest.mark.usefixtures("one_thread")
# One eve_tiny MSM training step through the ZeRO-2 bf16 engine, as of this test's writing. Forward syncs:
# 2 x int(C) in DeepSpeed's soft router (the real-token index and the MLM positions have host-known sizes).
# Step: none (eve_ds.train.zero_step: DeepSpeed's per-group bool() of the clip norm and torch.tensor(-1.0,
# device=) are gone); the step's non-view ops (the per-tensor overflow check is off; the norm, the clip
# factor and found_inf once per step, not per parameter group). They must only go down: lower them when a
# change removes a sync or ops, never raise them.
FORWARD_SYNCS_EVE_TINY = 2
STEP_SYNCS_EVE_TINY = 0
STEP_OPS_EVE_TINY = 351


def line_of(fn, text: str) -> int:
    """The line number of the first source line of `fn` that contains `text`."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


class ReadsItem(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().max().item()
        return x[x > 0].sum() / scale


def test_item_and_bool_mask_sites_with_file_line():
    x = torch.randn(6, 4, requires_grad=True)
    fwd, y = count_call(lambda: ReadsItem()(x), record_forward_sites=True)
    bwd, _ = count_call(y.backward)
    item_line = line_of(ReadsItem.forward, ".item()")
    mask_line = line_of(ReadsItem.forward, "x[x > 0]")
    sites = fwd.to_dict()["syncs"]
    assert [s.split(" <- ")[0] for s, _ in sites] == [
        f"index[bool mask] @ tests/test_count.py:{mask_line}",
        f"item @ tests/test_count.py:{item_line}",
    ]
    assert [n for _, n in sites] == [1, 1]
    # The backward names the forward line that built the node, marked as such.
    [(site, n)] = bwd.to_dict()["syncs"]
    assert n == 1 and site.startswith(f"index_put[bool mask] @ tests/test_count.py:{mask_line}")
    assert site.endswith("(backward)")
    assert fwd.compute_ops > 0 and bwd.compute_ops > 0


def test_host_copies_and_accelerator_synchronize_are_counted():
    from deepspeed.accelerator import get_accelerator

    def body():
        t = torch.arange(3)
        t.tolist()
        t.cpu()
        get_accelerator().synchronize()

    count, _ = count_call(body)
    kinds = sorted(s.split(" @ ")[0] for s, _ in count.to_dict()["syncs"])
    assert kinds == [".cpu()", ".tolist()", "accelerator.synchronize"]
    sync_line = line_of(body, "synchronize()")
    assert any(
        s.startswith(f"accelerator.synchronize @ tests/test_count.py:{sync_line}")
        for s, _ in count.to_dict()["syncs"]
    )
    assert "synchronize" not in vars(get_accelerator())  # the wrapper is gone after the block


def test_one_hot_range_check_is_cpu_only():
    count, _ = count_call(lambda: torch.nn.functional.one_hot(torch.tensor([0, 2]), 3))
    assert count.num_syncs == 0 and sum(count.cpu_only_syncs.values()) == 2


@pytest.fixture(scope="module")
def tiny_engine():
    from eve_ds.train.distributed import init_distributed

    init_distributed("cpu", timeout_s=600)
    bc = BenchConfig(model="eve_tiny", ds_config="zero2_bf16")
    cfg, obj = get_config("eve_tiny"), ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    engine, dtype = build_bench_engine(bc, cfg, obj, 2)
    batch = next(memory_batches(cfg, obj, 2, bc, dtype, num_batches=1))
    for _ in range(2):
        train_step(engine, batch)
    return engine, batch


def test_engine_step_counts_are_deterministic_and_phases_apart(tiny_engine):
    engine, batch = tiny_engine
    a, b = count_engine_step(engine, batch), count_engine_step(engine, batch)
    for phase in ("forward", "backward", "step"):
        assert a[phase].ops == b[phase].ops and a[phase].syncs == b[phase].syncs, phase
    sites = {p: {site for _, site in a[p].syncs} for p in a}
    assert sites["forward"] and all("deepspeed/moe/sharded_moe.py:667" in s for s in sites["forward"])
    assert sites["backward"] == set()
    assert all("stage_1_and_2.py" not in s for s in sites["forward"] | sites["backward"])
    every = sites["forward"] | sites["backward"] | sites["step"]
    assert all("stage_1_and_2.py:3248" not in s for s in every)  # no per-tensor overflow check's .item()
    assert all("deepspeed/utils/timer.py" not in s for s in every)  # no throughput-timer synchronize()
    assert all(s.endswith("(backward)") for s in sites["backward"])
    assert a["step"].compute_ops < a["forward"].compute_ops


def test_nonfinite_gradients_skip_the_update_on_the_device(tiny_engine):
    """bf16 without DeepSpeed's overflow check: a step whose gradients hold a NaN leaves every parameter as
    it was, and the guard itself reads nothing to the host; the next finite step updates them."""
    from eve_ds.train.engine import nonfinite

    engine, batch = tiny_engine
    params = dict(engine.module.named_parameters())
    finite = count_engine_step(engine, batch)["step"].syncs
    before = {n: p.detach().clone() for n, p in params.items()}
    hook = next(iter(params.values())).register_hook(lambda g: torch.full_like(g, float("nan")))
    try:
        skipped = count_engine_step(engine, batch)["step"].syncs
    finally:
        hook.remove()
    assert nonfinite(engine.get_global_grad_norm()).item() == 1.0
    assert all(torch.equal(before[n], p) for n, p in params.items())
    # No reads on a skipped step either (DeepSpeed's own clip made torch.tensor(inf, device=) per group).
    assert not finite and not skipped
    train_step(engine, batch)
    assert nonfinite(engine.get_global_grad_norm()).item() == 0.0
    assert sum(not torch.equal(before[n], p) for n, p in params.items()) > len(params) // 2


def test_eve_profile_count_json_and_forward_sync_guard(tmp_path, capsys):
    from eve_ds.cli.profile import main as profile

    out = tmp_path / "count.json"
    args = ["--model", "eve_tiny", "--device", "cpu", "--batch-size", "2", "--task-set", "mlm,mim_pixel"]
    assert profile([*args, "--count", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    for phase in ("forward", "backward", "step"):
        assert d[phase]["ops"] > 0 and all(isinstance(n, int) and n > 0 for _, n in d[phase]["syncs"])
    assert d["model"] == "eve_tiny" and d["batch_size"] == 2 and d["meta"]["versions"]["deepspeed"]
    assert d["meta"]["command"].startswith("eve-profile --model eve_tiny")
    forward_syncs = sum(n for _, n in d["forward"]["syncs"])
    assert forward_syncs == d["forward"]["num_syncs"] <= FORWARD_SYNCS_EVE_TINY
    assert d["step"]["num_syncs"] <= STEP_SYNCS_EVE_TINY and d["step"]["ops"] <= STEP_OPS_EVE_TINY
    assert d["graph_breaks"] == d["blocks"]["soft"]["breaks"] and d["blocks"]["hard"]["breaks"] == 0
    # both kinds in both passes (MLM: the full image, MIM: the kept patches); DeepSpeed's MoE breaks
    for kind, compiled in (("hard", True), ("soft", False)):
        b = d["blocks"][kind]
        assert b["compiled"] == compiled and [p["n_image"] for p in b["passes"]] == [17, 5]
    assert all(p["breaks"] > 0 for p in d["blocks"]["soft"]["passes"])
    assert "non-view ops" in capsys.readouterr().out
