"""EVLM-MoE: upcycling preserves the dense FFN, top-4 routing without drops, and expert parallelism."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from deepspeed.moe.experts import Experts

from eve_ds.models.evlm import EVLMModel, get_config
from eve_ds.models.evlm.moe_xattn import StackedSwiGLUExperts, WorldMoE, expert_slice, upcycle
from eve_ds.models.evlm.xattn import build_ffn

pytestmark = pytest.mark.usefixtures("one_thread")
D, F_, E, TOP = 32, 64, 16, 4


def upcycled(
    beta: float = 0.0, ep_size: int = 1, ep_rank: int = 0, noise: float = 0.0
) -> tuple[torch.nn.Module, WorldMoE]:
    torch.manual_seed(0)
    dense = build_ffn(D, F_, "swiglu")
    moe = WorldMoE(D, F_, F_ // 4, E, TOP, ep_size=ep_size, beta_init=beta)
    upcycle(dense, moe, copies=4, slices=4, ep_rank=ep_rank, noise=noise)
    return dense, moe


def test_upcycled_moe_equals_the_dense_ffn_at_step_0():
    dense, moe = upcycled()
    x = torch.randn(2, 9, D)
    out, _, _ = moe(x)
    assert torch.equal(out, dense(x))
    _, moe_open = upcycled(beta=0.5)
    assert not torch.allclose(moe_open(x)[0], dense(x))  # the routed part is live once beta moves


def test_the_slices_of_a_copy_sum_to_the_dense_ffn():
    dense, moe = upcycled()
    x = torch.randn(7, D)
    for copy in range(4):
        total = sum(moe.local_experts[copy * 4 + s](x) for s in range(4))
        torch.testing.assert_close(total, dense(x), atol=1e-6, rtol=1e-5)
    assert torch.equal(moe.local_experts[1].fc1_g.weight, moe.local_experts[5].fc1_g.weight)  # copies agree
    assert expert_slice(dense, 2, 4)["fc2.weight"].shape == (D, F_ // 4)


def test_top4_drops_no_token_under_maximal_imbalance_and_matches_a_hand_mixture():
    _, moe = upcycled(beta=1.0)
    gate = moe.moe.deepspeed_moe.gate.wg
    with torch.no_grad():  # every token prefers experts 0-3
        gate.weight.zero_()
        gate.weight[:4, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    x = torch.randn(40, D)
    x[:, 0] = x[:, 0].abs() + 1.0
    out, l_aux, counts = moe(x[None])
    assert counts.tolist() == [40] * 4 + [0] * 12  # capacity grows to 40: nothing dropped
    probs = torch.softmax(x @ gate.weight.T, -1)[:, :4]
    probs = probs / probs.sum(-1, keepdim=True)
    want = moe.world(x) + torch.tanh(torch.tensor(1.0)) * sum(
        probs[:, [e]] * moe.local_experts[e](x) for e in range(4)
    )
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=1e-5)
    ce, me = torch.zeros(E), torch.softmax(x @ gate.weight.T, -1).mean(0)
    ce[:4] = 1.0
    torch.testing.assert_close(l_aux, (me * ce).mean() * E * E / TOP)


def test_padding_is_not_routed():
    _, moe = upcycled(beta=0.5)
    x, valid = torch.randn(2, 6, D), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out, _, counts = moe(x, valid)
    assert int(counts.sum()) == TOP * 8
    assert torch.equal(out[~valid], moe.world(x[~valid]))
    row = moe(x[1:, :5])[0]
    torch.testing.assert_close(out[1, :5], row[0], atol=1e-6, rtol=0)


def test_stacked_swiglu_experts_equal_deepspeeds_loop():
    _, moe = upcycled()
    stacked = moe.moe.deepspeed_moe.experts
    assert isinstance(stacked, StackedSwiGLUExperts)
    loop = Experts(build_ffn(D, F_ // 4, "swiglu"), E)
    loop.load_state_dict(stacked.state_dict())
    x = torch.randn(1, E, 5, D)
    torch.testing.assert_close(stacked(x), loop(x), atol=1e-6, rtol=1e-5)


def test_evlm_moe_upcycled_from_dense_gives_the_dense_logits():
    from test_evlm_model import MEDIA, TWO_ROWS, batch_of

    torch.manual_seed(0)
    dense = EVLMModel(get_config("evlm_tiny", media_token_id=MEDIA, gate_init=0.5)).eval()
    moe = EVLMModel(get_config("evlm_tiny_moe", media_token_id=MEDIA, gate_init=0.5)).eval()
    moe.upcycle_from(dense.state_dict())
    b = batch_of(TWO_ROWS)
    with torch.no_grad():
        want, out = dense(b), moe(b)
    assert torch.equal(out.logits, want.logits)
    assert len(out.expert_counts) == 4 and out.aux_loss > 0
    assert int(out.expert_counts[0].sum()) == TOP * int(b["valid"].sum())


# -- expert parallelism: ep_size 2 over two gloo processes == ep_size 1 ------------------------------


def _tokens(rank: int) -> torch.Tensor:
    return torch.randn(1, 12 + 20 * rank, D, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    _, moe = upcycled(beta=0.7, ep_size=2, ep_rank=rank, noise=0.05)  # noise: experts g, g + 8 differ
    moe.moe.set_deepspeed_parallelism()
    out, _, _ = moe(_tokens(rank))
    out.square().sum().backward()
    grads = {
        f"{rank * 8 + i}.{n}": p.grad
        for i, e in enumerate(moe.local_experts)
        for n, p in e.named_parameters()
    }
    torch.save({"out": out.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_top4_at_ep_size_2_equals_ep_size_1(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _, ref = upcycled(beta=0.7, noise=0.05)
    total = 0.0
    for r in range(2):
        out, _, _ = ref(_tokens(r))
        assert torch.equal(out.detach(), ranks[r]["out"])
        total = total + out.square().sum()
    total.backward()  # each expert's grad on 2 ranks = the sum over both ranks' tokens (no DP averaging here)
    for g, e in enumerate(ref.local_experts):
        for n, p in e.named_parameters():
            torch.testing.assert_close(ranks[g // 8]["grads"][f"{g}.{n}"], p.grad, atol=1e-5, rtol=1e-5)


# -- active parameters per token: the world expert + the top-4 of the 16 routed ones --------------------


@pytest.mark.parametrize(
    "flavor, layers, h",
    [("evlm_tiny_moe", 4, 128), ("evlm_14b_moe", 40, 5120)],
)
def test_eve_info_counts_the_world_expert_and_the_top4_as_active(flavor, layers, h, capsys):
    """By hand: each cross-attention FFN of hidden h/2 (SwiGLU, 3 matrices) becomes a world expert of the
    same size + 16 experts of hidden h/8 and a router (h x 16) and the tanh(beta) scalar. A token uses the
    world expert, 4 experts, the router and beta: what the MoE adds to the dense model's active count is,
    per layer, a second dense FFN (4 quarter-slices) + the router + beta; to its total, 16 experts."""
    from eve_ds.cli.info import main

    dense_flavor = flavor.removesuffix("_moe")
    ffn, expert, router = 3 * h * (h // 2), 3 * h * (h // 8), h * 16
    assert 4 * expert == ffn
    counts = {}
    for name in (dense_flavor, flavor):
        assert main([name, "--json"]) == 0
        counts[name] = json.loads(capsys.readouterr().out)
    dense, moe = counts[dense_flavor], counts[flavor]
    assert dense["active_params_per_token"] == dense["total_params"]
    assert moe["active_params_per_token"] == dense["total_params"] + layers * (4 * expert + router + 1)
    assert moe["total_params"] == dense["total_params"] + layers * (16 * expert + router + 1)
    assert main([flavor, "ep_size=8", "--json"]) == 0  # the layout does not change what a token uses
    assert json.loads(capsys.readouterr().out)["active_params_per_token"] == moe["active_params_per_token"]
    if flavor == "evlm_14b_moe":  # the numbers docs/evlm.md gives
        assert (moe["total_params"], moe["active_params_per_token"]) == (26_950_327_672, 22_231_735_672)
    else:  # and the built model agrees, also with 8 of the 16 experts on this rank
        for ep_size in (1, 2):
            built = EVLMModel(get_config(flavor, media_token_id=63, ep_size=ep_size))
            assert built.active_params_per_token() == moe["active_params_per_token"]
