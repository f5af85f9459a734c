"""model.moe_dispatch=grouped with expert parallelism (ep_size=2, two gloo processes) computes DeepSpeed's
soft router: on each rank the outputs, aux loss, expert loads, input gradient and every parameter
gradient equal those of DeepSpeed's layer at ep_size=2 and at ep_size=1, to 1e-6 relative in fp32.

Global expert g has the same weights in every layout (rank r holds g = r * E / 2 + i as local expert i).
At ep_size=1 each rank runs all experts on its own tokens; an expert's gradient at ep_size=2 is the sum of
what the tokens of both ranks give it, so the ep_size=1 expert gradients are summed over the ranks before
the comparison. The other gradients are each rank's own (no data-parallel averaging at the layer).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from eve_ds.bench.count import count_call
from eve_ds.models.config import eve_tiny
from eve_ds.models.layers import SoftRouterFFN, Tokens

WORLD, E, TOL = 2, 4, 1e-6
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def layer(top_k: int, ep_size: int, dispatch: str, rank: int) -> SoftRouterFFN:
    """A soft-router layer, the same global parameters whatever the layout; its expert-parallel group set
    up as the engine does it (`set_deepspeed_parallelism`)."""
    cfg = eve_tiny(num_experts=E, top_k=top_k, hidden_size=32, ffn_size=64, ep_size=ep_size)
    torch.manual_seed(0)  # the dense parameters: the same on both ranks
    ffn = SoftRouterFFN(dataclasses.replace(cfg, moe_dispatch=dispatch))
    with torch.no_grad():
        ffn.moe.gate.modality_bias.normal_(0, 0.5)
        ffn.moe.gate.wg.weight.normal_(0, 0.5)
        n_local = E // ep_size
        for i, expert in enumerate(ffn.moe.local_experts):
            gen = torch.Generator().manual_seed(100 + (rank % ep_size) * n_local + i)
            for p in expert.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ffn.moe.set_deepspeed_parallelism()
    return ffn


def run(ffn: SoftRouterFFN, rank: int) -> dict:
    """This rank's tokens (odd samples padded), forward, backward of <out, g> + 0.37 l_aux."""
    gen = torch.Generator().manual_seed(1 + rank)
    B, n_image, n_text = 4, 17, 12
    x = torch.randn(B, n_image + n_text, 32, generator=gen).requires_grad_()
    g = torch.randn(x.shape, generator=gen)
    valid = torch.ones(B, n_image + n_text, dtype=torch.bool)
    valid[1::2, -3:] = False
    tok = Tokens(n_image, None, ~valid, valid)
    out, l_aux, counts = ffn(x, tok)
    ((out * g).sum() + 0.37 * l_aux).backward()
    grads = {n: p.grad.clone() for n, p in ffn.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "l_aux": l_aux.detach(), "counts": counts, "dx": x.grad, "grads": grads}


def global_expert_grads(res: dict, rank: int, ep_size: int) -> dict[tuple[int, str], torch.Tensor]:
    """{(global expert id, parameter name): gradient} of a run's expert parameters."""
    out = {}
    for name, grad in res["grads"].items():
        if ".deepspeed_experts." in name:
            i, rest = name.split(".deepspeed_experts.")[1].split(".", 1)
            out[((rank % ep_size) * (E // ep_size) + int(i), rest)] = grad
    return out


def assert_same(ours: dict, ref: dict, rank: int, ref_ep: int) -> None:
    import torch.distributed as dist

    assert torch.equal(ours["counts"], ref["counts"])
    assert rel_err(ours["out"], ref["out"]) <= TOL and rel_err(ours["dx"], ref["dx"]) <= TOL
    assert abs(float(ours["l_aux"] - ref["l_aux"])) <= TOL * float(ref["l_aux"])
    dense = [n for n in ref["grads"] if ".deepspeed_experts." not in n]
    assert "moe.deepspeed_moe.gate.modality_bias" in dense
    for name in dense:
        assert rel_err(ours["grads"][name], ref["grads"][name]) <= TOL, name
    expected = global_expert_grads(ref, rank, ref_ep)
    if ref_ep == 1:  # ep_size=2 experts get the tokens of both ranks
        for grad in expected.values():
            dist.all_reduce(grad)
    got = global_expert_grads(ours, rank, WORLD)
    assert len(got) == 4 * E // WORLD
    for key, grad in got.items():
        assert rel_err(grad, expected[key]) <= TOL, key


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for top_k in (1, 2):
        grouped = run(layer(top_k, WORLD, "grouped", rank), rank)
        assert_same(grouped, run(layer(top_k, WORLD, "deepspeed", rank), rank), rank, WORLD)
        assert_same(grouped, run(layer(top_k, 1, "deepspeed", rank), rank), rank, 1)
    # The forward at ep_size=2 reads nothing to the host (DeepSpeed's: int(C) and nonzero).
    ffn, x = layer(2, WORLD, "grouped", rank), torch.randn(4, 29, 32)
    valid = torch.ones(4, 29, dtype=torch.bool)
    counted, _ = count_call(lambda: ffn(x, Tokens(17, None, ~valid, valid)))
    assert counted.num_syncs == 0, counted.to_dict()["syncs"]


def test_grouped_dispatch_at_ep2_equals_deepspeed_at_ep2_and_ep1():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
