"""model.moe_dispatch=grouped (sort by expert + torch._grouped_mm) computes today's DeepSpeed soft router:
outputs, aux loss, expert loads and every gradient to 1e-6 relative in fp32, at the layer and through the
whole eve_tiny model, with no would-be host sync in its forward; a checkpoint written with either dispatch
loads into the other. (Expert parallelism: tests/test_moe_dispatch_ep.py and tests/test_model_ep.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_batch

from eve_ds.bench.count import count_call
from eve_ds.models.config import eve_tiny
from eve_ds.models.layers import SoftRouterFFN, Tokens
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.utils.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def layer_pair(top_k: int, bias_to_experts: bool = False) -> tuple[SoftRouterFFN, SoftRouterFFN]:
    """Two soft-router layers with the same random parameters (modality bias included), 8 experts."""
    cfg = eve_tiny(
        num_experts=8, top_k=top_k, hidden_size=32, ffn_size=64, modality_bias_to_experts=bias_to_experts
    )
    torch.manual_seed(0)
    ref = SoftRouterFFN(cfg)
    with torch.no_grad():
        ref.moe.gate.modality_bias.normal_(0, 0.5)
        for p in ref.moe.local_experts.parameters():
            p.normal_(0, 0.2)
    grouped = SoftRouterFFN(dataclasses.replace(cfg, moe_dispatch="grouped"))
    grouped.load_state_dict(ref.state_dict())
    return ref, grouped


def tokens(B: int, n_image: int, n_text: int) -> Tokens:
    """[image; text] positions with text padding on odd samples (3 positions)."""
    valid = torch.ones(B, n_image + n_text, dtype=torch.bool)
    valid[1::2, -3:] = False
    return Tokens(n_image, None, ~valid, valid)


def run(layer: SoftRouterFFN, x: torch.Tensor, tok: Tokens, g: torch.Tensor) -> dict:
    """Forward, then a backward of <out, g> + 0.37 l_aux -> outputs and every gradient."""
    x = x.clone().requires_grad_()
    layer.zero_grad()
    out, l_aux, counts = layer(x, tok)
    ((out * g).sum() + 0.37 * l_aux).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "l_aux": l_aux.detach(), "counts": counts, "dx": x.grad, "grads": grads}


@pytest.mark.parametrize(
    "top_k,n_image,n_text,bias_to_experts",
    [(k, i, t, False) for k in (1, 2) for i, t in ((17, 12), (5, 12), (17, 0), (0, 12))]
    + [(2, 17, 12, True)],
)
def test_grouped_layer_equals_deepspeed(top_k, n_image, n_text, bias_to_experts):
    """bias_to_experts: the official release's MoE, whose experts see x + b_m as the router does."""
    ref, grouped = layer_pair(top_k, bias_to_experts)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, n_image + n_text, 32, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    tok = tokens(4, n_image, n_text) if n_text else Tokens(n_image, None, None, torch.ones(4, n_image).bool())
    a, b = run(ref, x, tok, g), run(grouped, x, tok, g)
    assert torch.equal(b["counts"], a["counts"]) and a["counts"].sum() == top_k * int(tok.valid.sum())
    assert rel_err(b["out"], a["out"]) <= TOL
    assert (b["out"][~tok.valid] == 0).all()  # padding positions stay 0, as the gather-scatter leaves them
    assert abs(float(b["l_aux"] - a["l_aux"])) <= TOL * float(a["l_aux"])
    assert rel_err(b["dx"], a["dx"]) <= TOL
    assert a["grads"].keys() == b["grads"].keys() and "moe.deepspeed_moe.gate.modality_bias" in a["grads"]
    for name in a["grads"]:
        assert rel_err(b["grads"][name], a["grads"][name]) <= TOL, name


def test_grouped_model_equals_deepspeed():
    """The whole eve_tiny MSM loss and every gradient, through both dispatches; same state-dict names."""
    cfg = eve_tiny(num_experts=8)
    obj = ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    results = {}
    for dispatch in ("deepspeed", "grouped"):
        torch.manual_seed(0)
        model = PretrainingModel(dataclasses.replace(cfg, moe_dispatch=dispatch), obj)
        if dispatch == "grouped":
            model.load_state_dict(results["deepspeed"][2])
        out = model(make_batch(cfg, B=4), generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[dispatch] = (out, grads, model.state_dict())
    (out_a, grads_a, state_a), (out_b, grads_b, state_b) = results["deepspeed"], results["grouped"]
    assert state_a.keys() == state_b.keys()
    for key in ("loss", "mlm_loss", "mim_pixel_loss", "aux_loss"):
        assert abs(float(out_b[key].detach() - out_a[key].detach())) <= TOL * float(out_a[key].detach()), key
    assert grads_a.keys() == grads_b.keys() and any(".experts." in n for n in grads_a)
    for name in grads_a:
        assert rel_err(grads_b[name], grads_a[name]) <= 1e-5, name


def test_grouped_forward_has_no_syncs_and_fewer_ops():
    ref, grouped = layer_pair(2)
    x = torch.randn(4, 29, 32)
    tok = tokens(4, 17, 12)
    counted = {}
    for name, layer in (("deepspeed", ref), ("grouped", grouped)):
        tok.valid_index = None  # each layer finds the real tokens itself
        counted[name], _ = count_call(lambda layer=layer: layer(x, tok))
    sites = {kind_site.split(" @ ")[0] for kind_site, _ in counted["deepspeed"].to_dict()["syncs"]}
    assert {"nonzero", "item"} <= sites  # DeepSpeed's path: the counter sees its syncs
    assert "bincount" not in sites  # the expert loads are a scatter_add_ on both paths
    assert counted["grouped"].num_syncs == 0 and not counted["grouped"].cpu_only_syncs
    assert counted["grouped"].compute_ops < counted["deepspeed"].compute_ops


@pytest.mark.parametrize(
    "override,key",
    [
        ({"moe_dispatch": "bad"}, "model.moe_dispatch"),
        ({"moe_dispatch": "grouped", "drop_tokens": True}, "model.drop_tokens"),
        ({"moe_dispatch": "grouped", "top2_second_expert_sampling": True}, "model.top2_second_expert"),
    ],
)
def test_grouped_config_rules(override, key):
    """The config names the key that the grouped dispatch cannot honour."""
    with pytest.raises(ConfigError, match=key):
        eve_tiny(**override)


def engine_of(dispatch: str):
    """eve_tiny MSM through the trainer's engine builder (ZeRO-2, fp32 on CPU), 4 experts."""
    from eve_ds.train.config import load_config
    from eve_ds.train.distributed import init_distributed
    from eve_ds.train.engine import build_engine

    init_distributed("cpu", timeout_s=600)
    overrides = ["model.num_experts=4", f"model.moe_dispatch={dispatch}", "model.drop_path_rate=0.0"]
    cfg = load_config(
        "eve_tiny_synthetic", [*overrides, "train.global_batch_size=2", "train.micro_batch_size=2"]
    )
    # Different initial weights per dispatch: the load must fill them.
    torch.manual_seed(0 if dispatch == "deepspeed" else 1)
    model = PretrainingModel(cfg.model, cfg.objective)
    model.init_experts(0)
    engine, *_ = build_engine(cfg, model, 1, "cpu")
    return engine, cfg


@pytest.mark.parametrize("saved,loaded", [("deepspeed", "grouped"), ("grouped", "deepspeed")])
def test_checkpoint_of_one_dispatch_loads_into_the_other(tmp_path, saved, loaded):
    """A DeepSpeed checkpoint (model and expert files, optimizer state) written with one dispatch loads
    into an engine with the other: the same weights bit for bit, the same losses to float precision."""
    engine, cfg = engine_of(saved)
    batch = make_batch(cfg.model, B=2)
    out = engine(batch, torch.Generator().manual_seed(3))
    engine.backward(out["loss"])
    engine.step()  # the saved state includes a step's Adam moments
    engine.save_checkpoint(str(tmp_path), tag="t")
    want = {k: v.detach().float() for k, v in engine(batch, torch.Generator().manual_seed(4)).items()}
    other, _ = engine_of(loaded)
    other.load_checkpoint(str(tmp_path), tag="t")
    a, b = engine.module.state_dict(), other.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = other(batch, torch.Generator().manual_seed(4))
    for key in ("loss", "mlm_loss", "mim_pixel_loss", "aux_loss"):
        assert abs(float(got[key].detach() - want[key])) <= TOL * float(want[key]), key
