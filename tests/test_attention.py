"""model.attention_kernel: "sdpa" and "flex" compute the reference "sdpa_bias" attention (one additive float
mask) to float precision, forward and every gradient (the relative position bias table's included), on
EVE-Base's head layout (12 heads) at tiny widths, with padded keys, in the full-image pass, the MIM pass
(a subset of the patches) and text alone; and "sdpa" without bias or padding calls SDPA with no mask.

FlexAttention on CPU in torch 2.14: its forward runs (unfused: the eager path materialises the scores; the
compiled one too), its backward does not (`flex_attention` refuses inputs that require grad on CPU, compiled
or not). The gradient tests lift that guard (`cpu_flex_backward`): FlexAttention's own eager
implementation then keeps the log-sum-exp and differentiates the score_mod and mask_mod through its dense
reference backward, the same graphs that the compiled CUDA kernel's backward is built from."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from conftest import make_batch

from eve_ds.bench.count import count_call
from eve_ds.models.config import eve_base, eve_tiny
from eve_ds.models.layers import Attention, Tokens, padding_bias, padding_fill
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.utils.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
# EVE-Base's 12 heads at width 96 (head dim 8) on a 4 x 4 grid.
CFG = eve_base(hidden_size=96, ffn_size=192, image_size=64)


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """FlexAttention's eager path with its CPU backward guard lifted and the log-sum-exp kept."""
    keep_options = flex_module._apply_kernel_options

    def with_lse(*args, **kwargs):
        options = keep_options(*args, **kwargs)
        options["OUTPUT_LOGSUMEXP"] = True
        return options

    monkeypatch.setattr(flex_module, "_validate_device", lambda *a: None)
    monkeypatch.setattr(flex_module, "_apply_kernel_options", with_lse)


def attention(kernel: str, rel_pos_bias: bool = True) -> Attention:
    """The same random attention (bias table, q/v biases included) with `kernel`."""
    torch.manual_seed(0)
    attn = Attention(dataclasses.replace(CFG, rel_pos_bias=rel_pos_bias, attention_kernel=kernel))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def pass_inputs(kind: str, padded: bool) -> tuple[torch.Tensor, Tokens]:
    """x (3, N, 96) and its tokens: "image" = [cls; 16 patches; 9 text], "mim" = [cls; 6 of 16 patches;
    9 text], "text" = 9 text tokens; `padded`: captions 0 and 2 end in 3 and 5 padding tokens."""
    B, L = 3, 9
    gen = torch.Generator().manual_seed(1)
    patch_ids = None
    n_image = {"image": 1 + CFG.num_patches, "mim": 7, "text": 0}[kind]
    if kind == "mim":
        patch_ids = torch.stack([torch.randperm(CFG.num_patches, generator=gen)[:6] for _ in range(B)])
    N = n_image + L
    valid = torch.ones(B, N, dtype=torch.bool)
    if padded:
        valid[0, -3:] = valid[2, -5:] = False
    x = torch.randn(B, N, CFG.hidden_size, generator=gen)
    return x, Tokens(n_image, patch_ids, ~valid if padded else None, valid)


def run(attn: Attention, x: torch.Tensor, tokens: Tokens) -> dict[str, torch.Tensor]:
    """Output and the gradients of <out, g> (g fixed, zero on padded queries, as a loss would be)."""
    x = x.clone().requires_grad_()
    out = attn(x, dataclasses.replace(tokens))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) * tokens.valid[..., None]
    (out * g).sum().backward()
    grads = {n: p.grad for n, p in attn.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "dx": x.grad} | grads


def assert_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        err = float((got[name] - r).abs().max() / r.abs().max())
        assert err < TOL, f"{name}: relative difference {err:.2e}"


@pytest.mark.parametrize("kind", ["image", "mim", "text"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("rel_pos_bias", [True, False])
@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_kernels_equal_the_reference(kernel, rel_pos_bias, padded, kind, cpu_flex_backward):
    x, tokens = pass_inputs(kind, padded)
    ref = run(attention("sdpa_bias", rel_pos_bias), x, tokens)
    got = run(attention(kernel, rel_pos_bias), x, tokens)
    assert_close(got, ref)
    if rel_pos_bias and kind != "text":
        assert ref["rel_pos.relative_position_bias_table"].abs().sum() > 0


def test_flex_forward_runs_on_cpu_without_the_guard_lifted():
    x, tokens = pass_inputs("mim", padded=True)
    with torch.no_grad():
        ref = attention("sdpa_bias")(x, dataclasses.replace(tokens))
        out = attention("flex")(x, dataclasses.replace(tokens))
    assert float((out - ref).abs().max() / ref.abs().max()) < TOL
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        attention("flex")(x, dataclasses.replace(tokens))


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_without_bias_takes_no_float_mask(padded):
    """Without the bias, "sdpa" gives SDPA no mask (no padding: flash-eligible on CUDA) or a boolean one,
    where the reference builds a float mask (`masked_fill` of finfo.min). With the bias (a float mask that
    requires grad) SDPA runs its math path on CPU (two bmm), a fused kernel otherwise."""
    x, tokens = pass_inputs("image", padded)
    flash = "_scaled_dot_product_flash_attention_for_cpu"
    for kernel in ("sdpa", "sdpa_bias"):
        attn = attention(kernel, rel_pos_bias=False)
        count, _ = count_call(lambda a=attn: a(x, dataclasses.replace(tokens)))
        assert count.ops[flash] == 1 and "bmm" not in count.ops
        assert ("masked_fill" in count.ops) == (kernel == "sdpa_bias" and padded)
        assert ("where" in count.ops) == (kernel == "sdpa" and padded)  # SDPA's lowering of a boolean mask
    count, _ = count_call(lambda: attention("sdpa")(x, dataclasses.replace(tokens)))
    assert count.ops["bmm"] == 2 and flash not in count.ops


def test_model_losses_and_gradients_equal_across_kernels(cpu_flex_backward):
    """Through eve_tiny's MSM step (padded captions): the same losses and gradients to float precision."""
    batch = make_batch(eve_tiny(), B=3, L=12)
    results = {}
    for kernel in ("sdpa_bias", "sdpa", "flex"):
        torch.manual_seed(0)
        model = PretrainingModel(
            eve_tiny(attention_kernel=kernel), ObjectiveConfig(objectives=["mlm", "mim_pixel"])
        )
        out = model(batch, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
        results[kernel] = {"loss": out["loss"].detach()[None]} | {
            n: p.grad for n, p in model.named_parameters() if p.grad is not None
        }
    table = "encoder.blocks.0.attn.rel_pos.relative_position_bias_table"
    assert results["sdpa_bias"][table].abs().sum() > 0
    for kernel in ("sdpa", "flex"):
        assert_close(results[kernel], results["sdpa_bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["image", "mim", "text"])
@pytest.mark.parametrize("rel_pos_bias", [True, False])
@pytest.mark.parametrize("kernel", ["sdpa", "sdpa_bias"])
def test_the_padding_mask_made_once_gives_every_block_bit_for_bit_its_own(kernel, rel_pos_bias, kind, dtype):
    x, tokens = pass_inputs(kind, padded=True)
    attn = attention(kernel, rel_pos_bias).to(dtype)
    x = x.to(dtype)
    fill = padding_fill(kernel, rel_pos_bias and tokens.n_image > 0, dtype)
    once = dataclasses.replace(tokens, padding_bias=padding_bias(tokens.key_padding, fill, dtype))
    ref, got = run(attn, x, tokens), run(attn, x, once)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    count, _ = count_call(lambda: attn(x, dataclasses.replace(once)))
    assert "masked_fill" not in count.ops and "bitwise_not" not in count.ops


def test_the_model_s_losses_and_gradients_are_bit_for_bit_those_of_a_mask_per_block(monkeypatch):
    """eve_tiny's MSM step (padded captions), every kernel but flex: the padding mask made once per pass
    (`Tokens.padding_bias`) against each block making its own (what the blocks did before)."""
    import eve_ds.models.eve as eve_module

    batch = make_batch(eve_tiny(), B=3, L=12)
    for kernel in ("sdpa_bias", "sdpa"):
        results = []
        for once in (True, False):
            if not once:
                monkeypatch.setattr(eve_module, "padding_bias", lambda *a: None)
            torch.manual_seed(0)
            model = PretrainingModel(
                eve_tiny(attention_kernel=kernel), ObjectiveConfig(objectives=["mlm", "mim_pixel"])
            )
            out = model(batch, generator=torch.Generator().manual_seed(3))
            out["loss"].backward()
            results.append(
                [out["loss"].detach()] + [p.grad for p in model.parameters() if p.grad is not None]
            )
            monkeypatch.undo()
        assert len(results[0]) == len(results[1]) > 10
        assert all(torch.equal(a, b) for a, b in zip(*results)), kernel


def test_bad_kernel_is_refused():
    with pytest.raises(ConfigError, match=r"model.attention_kernel.*sdpa_bias \| sdpa \| flex"):
        eve_tiny(attention_kernel="flash")
