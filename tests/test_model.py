"""EVE model (shared encoder, hard/soft routers, MSM heads), single process, CPU.

Layers: flavor configs and eve-info -> forward/backward over every flavor -> what the losses may depend on
(MLM / MIM targets, masked patches) -> the soft router (modality routing, no token dropped, eq. 7 aux
loss, expert loads, ep-invariant initialisation) -> a few optimizer steps learn.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch
from deepspeed.moe.sharded_moe import top2gating

from eve_ds.cli.info import main as eve_info
from eve_ds.models.config import eve_tiny, get_config
from eve_ds.models.moe import IMAGE, TEXT, ModalityMoE
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.masking import mask_patches, mask_text, patchify
from eve_ds.utils.config import ConfigError

# eve_base / eve_large at full size take 10-30 s per step on 2 CPU cores: same depth, heads, soft-router
# blocks, 32 experts top-2, layer scale and relative position bias, narrower widths and a smaller vocabulary.
# eve_base keeps 224 px / 16 px patches (196 patches; 1 + 49 enter the MIM pass).
SMALL = {
    "eve_tiny": {},
    "eve_base": dict(
        hidden_size=96, ffn_size=192, vocab_size=512, decoder_depth=1, decoder_width=64, decoder_heads=4
    ),
    "eve_large": dict(
        hidden_size=64,
        ffn_size=128,
        vocab_size=512,
        image_size=64,
        decoder_depth=1,
        decoder_width=64,
        decoder_heads=4,
    ),
}


def build(cfg, seed: int = 0, **obj) -> PretrainingModel:
    torch.manual_seed(seed)
    return PretrainingModel(cfg, ObjectiveConfig(**obj))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def record_encoder_calls(model: PretrainingModel) -> list:
    """Collect the EncoderOutput of every encoder call (MLM pass first, then MIM)."""
    calls = []
    model.encoder.register_forward_hook(lambda m, args, out: calls.append(out))
    return calls


def record_gate_calls(model: PretrainingModel) -> list[dict]:
    """Every soft-router gate call: block, its input (before b_m), modality ids, l_aux and routes."""
    calls = []
    for i, block in enumerate(model.encoder.blocks):
        if block.soft:

            def hook(gate, args, out, i=i):
                calls.append(
                    {
                        "block": i,
                        "x": args[0].detach().clone(),
                        "modality": gate.modality.clone(),
                        "l_aux": out[0].detach(),
                        "routes": out[3].long(),
                    }
                )

            block.ffn.moe.gate.register_forward_hook(hook)
    return calls


pytestmark = pytest.mark.usefixtures("one_thread")


# -- flavors and eve-info ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layers, width, heads, ffn, soft",
    [
        ("eve_tiny", 4, 128, 4, 512, [3]),
        ("eve_base", 12, 768, 12, 3072, [10, 11]),
        ("eve_large", 24, 1024, 16, 4096, [21, 22, 23]),
    ],
)
def test_flavor_configs(name, layers, width, heads, ffn, soft):
    cfg = get_config(name)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.ffn_size) == (layers, width, heads, ffn)
    assert cfg.soft_blocks == soft and cfg.top_k == 2 and not cfg.drop_tokens
    assert cfg.num_experts == (4 if name == "eve_tiny" else 32)
    with pytest.raises(
        ValueError, match=r"model.ep_size=3 is invalid: expected a divisor of model.num_experts=32"
    ):
        get_config("eve_base", ep_size=3)


def run_info(capsys, *argv) -> dict:
    assert eve_info([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eve_info_json_base_and_large(capsys):
    base = run_info(capsys, "eve_base")
    assert {
        k: base[k]
        for k in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "ffn_size",
            "soft_router_blocks",
            "num_experts",
            "top_k",
            "ep_size",
        )
    } == {
        "num_layers": 12,
        "hidden_size": 768,
        "num_heads": 12,
        "ffn_size": 3072,
        "soft_router_blocks": [10, 11],
        "num_experts": 32,
        "top_k": 2,
        "ep_size": 1,
    }
    assert base["hard_router_blocks"] == list(range(10))
    large = run_info(capsys, "eve_large", "model.ep_size=4")
    assert (large["num_layers"], large["hidden_size"], large["num_heads"], large["ffn_size"]) == (
        24,
        1024,
        16,
        4096,
    )
    assert large["soft_router_blocks"] == [21, 22, 23] and large["ep_size"] == 4
    assert large["experts_per_rank"] == 8
    assert large["params_experts_per_rank"] * 4 == large["params_experts"]


def test_eve_info_counts_eve_base_by_hand(capsys):
    """The counts of eve_base from its architecture, independently of the module walk in info.py."""
    info = run_info(capsys, "eve_base")
    d, f, E, V = 768, 3072, 32, 30522
    attn = 3 * d * d + 2 * d + d * d + d  # qkv (no k bias) + q/v biases + proj
    per_block = attn + 2 * d + 2 * d  # + norm1 + layer-scale gamma_1, gamma_2
    ffn = d * f + f + f * d + d  # one FFN / expert
    hard = per_block + 2 * (2 * d + ffn)  # image and text norm + FFN
    router = E * d + 2 * d  # W and b_image, b_text
    soft = per_block + 2 * d + router + E * ffn
    rel_pos = ((2 * 14 - 1) ** 2 + 3) * 12
    embed = (
        3 * 16 * 16 * d + d + d + 197 * d + V * d + 40 * d + 2 * d
    )  # patch proj, cls, pos, word, text pos, type
    encoder = 10 * hard + 2 * soft + 2 * d + embed + 12 * rel_pos
    assert info["params_experts"] == 2 * E * ffn == 302_235_648
    assert info["params_embeddings"] == embed + 12 * rel_pos
    assert info["params_encoder"] == encoder
    active = 10 * (per_block + 2 * d + ffn) + 2 * (per_block + 2 * d + router + 2 * ffn) + 2 * d
    assert info["params_active_per_token"] == active == 94_562_304
    assert info["params_total"] == encoder + info["params_heads"]
    assert set(info["params_heads_by_objective"]) == {"mlm", "mim_pixel"}
    # With top-1 of the same experts, one expert per soft block fewer is active.
    top1 = run_info(capsys, "eve_base", "top_k=1")
    assert active - top1["params_active_per_token"] == 2 * ffn


def test_eve_info_table_and_errors(capsys):
    assert eve_info(["eve_tiny"]) == 0
    table = capsys.readouterr().out
    assert "soft-router blocks" in table and "4 / top-2" in table and "10.07 M" in table
    with pytest.raises(SystemExit):
        eve_info(["eve_tiny", "no_such_key=1"])
    assert "unknown key(s) ['no_such_key']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eve_info(["eve_huge"])


# -- forward / backward over every flavor ------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_backward_every_flavor(name):
    cfg = get_config(name, **SMALL[name])
    model = build(cfg)
    calls = record_encoder_calls(model)
    batch = make_batch(cfg, B=2, L=12)
    out = model(batch, gen())
    P, L, D = cfg.num_patches, 12, cfg.hidden_size
    n_keep = int(P * 0.25)
    mlm, mim = calls
    assert (mlm.n_image, mlm.hidden.shape) == (1 + P, (2, 1 + P + L, D))  # complete image + text
    assert (mim.n_image, mim.hidden.shape) == (1 + n_keep, (2, 1 + n_keep + L, D))  # 25% of the patches
    if name == "eve_base":
        assert mim.hidden.shape[1] == 1 + 49 + L
    assert sorted(mlm.expert_counts) == cfg.soft_blocks
    # Losses: finite, the total is their sum, the initial MLM loss is about log(V).
    for k in ("loss", "mlm_loss", "mim_pixel_loss", "aux_loss"):
        assert out[k].shape == () and torch.isfinite(out[k])
    torch.testing.assert_close(out["loss"], out["mlm_loss"] + out["mim_pixel_loss"] + out["aux_loss"])
    assert abs(out["mlm_loss"].item() - math.log(cfg.vocab_size)) < 1.0
    n_masked = sum(round((n - 2) * 0.5) for n in batch["text_mask"].sum(1).tolist())
    assert out["mlm_pred"].shape == out["mlm_target"].shape == (n_masked,)
    assert sorted(k for k in out if k.startswith("expert_load/")) == [
        f"expert_load/block{b}" for b in cfg.soft_blocks
    ]
    out["loss"].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    gate = model.encoder.blocks[cfg.soft_blocks[0]].ffn.moe.gate
    assert gate.wg.weight.grad.abs().sum() > 0 and gate.modality_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("B", [1, 2])  # B=1: no caption padded; B=2: the second one is
def test_host_padding_flag_gives_the_same_losses_and_gradients_without_a_sync(B):
    """`text_padded`, read by batch_to_device from the host copy of text_mask, replaces the encoder's
    bool(valid.all()): the same losses and gradients, bit for bit, and no host read in eve.py."""
    from eve_ds.bench.count import count_call
    from eve_ds.data.transforms import batch_to_device

    cfg = eve_tiny()
    batch = make_batch(cfg, B=B, L=12)
    flag = batch_to_device({"image": batch["image"], "text_mask": batch["text_mask"]}, "cpu")["text_padded"]
    assert flag is (B == 2)
    results = []
    for b in (batch, {**batch, "text_padded": flag}):
        model = build(cfg)
        count, out = count_call(lambda b=b, model=model: model(b, gen()), record_forward_sites=True)
        out["loss"].backward()
        eve_reads = sum(n for (_, site), n in count.syncs.items() if site.startswith("eve_ds/models/eve.py"))
        losses = {k: v for k, v in out.items() if k.endswith("_loss") or k == "loss"}
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}, eve_reads))
    (loss_a, grad_a, reads_a), (loss_b, grad_b, reads_b) = results
    assert loss_a.keys() == loss_b.keys() and all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)
    assert all(torch.equal(grad_a[n], grad_b[n]) for n in grad_a)
    assert reads_a == 2 and reads_b == 0  # one bool(valid.all()) per encoder pass (MLM, MIM) before


HOST_KEYS = ("text_padded", "text_real", "text_maskable")


def host_hints(batch: dict) -> dict:
    """What batch_to_device reads from the host copy of text_mask."""
    from eve_ds.data.transforms import batch_to_device

    moved = batch_to_device({"image": batch["image"], "text_mask": batch["text_mask"]}, "cpu")
    return {k: moved[k] for k in HOST_KEYS}


@pytest.mark.parametrize("dispatch", ["deepspeed", "grouped"])
@pytest.mark.parametrize("objectives", [["mlm", "mim_pixel"], ["msm_joint"]])
def test_host_counts_give_the_same_step_and_no_sync_in_forward_or_backward(dispatch, objectives):
    """The host-side counts of the data path (text_padded, text_real, text_maskable) replace every device
    read of the MSM forward and backward: the MLM positions and the soft routers' real tokens are indexed
    with host-known sizes. Same losses and gradients, bit for bit; no would-be sync in forward or backward
    left but DeepSpeed's int(C) of the no-drop capacity (none at all with moe_dispatch=grouped). This is the
    guard that fails when a sync comes back."""
    from eve_ds.bench.count import count_call

    cfg = dataclasses.replace(eve_tiny(), moe_dispatch=dispatch)
    batch = make_batch(cfg, B=3, L=12)
    hints = host_hints(batch)
    assert hints["text_padded"] and hints["text_real"] == int(batch["text_mask"].sum())
    results = []
    for b in (batch, {**batch, **hints}):
        model = build(cfg, objectives=objectives)
        fwd, out = count_call(lambda b=b, model=model: model(b, gen()), record_forward_sites=True)
        bwd, _ = count_call(out["loss"].backward)
        losses = {k: v for k, v in out.items() if k.endswith("_loss") or k == "loss"}
        syncs = [site for _, site in fwd.syncs | bwd.syncs]
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}, syncs))
    (loss_a, grad_a, syncs_a), (loss_b, grad_b, syncs_b) = results
    assert loss_a.keys() == loss_b.keys() and all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)
    assert all(torch.equal(grad_a[n], grad_b[n]) for n in grad_a)
    assert any("eve_ds/" in s for s in syncs_a)  # without the counts: nonzero, boolean MLM indexing
    left = [s for s in syncs_b if not s.startswith("deepspeed/moe/sharded_moe.py:667")]
    assert left == [], left
    assert (dispatch == "grouped") == (syncs_b == [])


def test_masked_text_count_is_the_number_of_masked_tokens():
    """The host count (pure Python) equals what mask_text masks on the device, for many lengths and
    ratios, rounding halves included (ratio 0.5 on odd counts)."""
    from eve_ds.objectives.masking import masked_text_count

    L = 40
    mask = (torch.arange(L)[None] < torch.arange(L + 1)[:, None]).long()  # every length 0..L
    ids = torch.full((L + 1, L), 7)
    for ratio in (0.15, 0.4, 0.5, 0.25, 1 / 3, 0.05, 0.9):
        _, mlm_mask = mask_text(ids, mask, ratio, 103, gen())
        assert masked_text_count(host_hints({"image": torch.zeros(1), "text_mask": mask}), ratio) == int(
            mlm_mask.sum()
        )
    assert masked_text_count({}, 0.15) is None


def test_head_options_come_from_objective_heads_and_old_saved_keys_still_load():
    """The task's head options reach the heads' constructors through `objective.heads`; a checkpoint saved
    with the former flat keys (`vqa_num_answers`, `nlvr2_head`) rebuilds the same heads."""
    cfg = eve_tiny()
    new = ObjectiveConfig(objectives=["vqa"], heads={"vqa": {"num_answers": 7}})
    assert PretrainingModel(cfg, new).objectives["vqa"].head[-1].out_features == 7
    old = {
        **dataclasses.asdict(ObjectiveConfig(objectives=["vqa"])),
        "vqa_num_answers": 7,
        "nlvr2_head": "concat",
    }
    del old["heads"]
    loaded = ObjectiveConfig.from_dict(old)
    assert loaded == new  # nlvr2_head dropped: nlvr2 is not trained
    nlvr2 = ObjectiveConfig.from_dict(
        {"objectives": ["nlvr2"], "nlvr2_head": "concat", "vqa_num_answers": 3129}
    )
    assert nlvr2.heads == {"nlvr2": {"head": "concat"}}
    assert type(PretrainingModel(cfg, nlvr2).objectives["nlvr2"].head).__name__ == "ConcatHead"
    from eve_ds.train.config import from_dict

    # A run directory's config.yaml of that time loads too (e.g. to find a fine-tuning run's data).
    run = from_dict({"objective": old, "task": {"name": "vqa", "synthetic": True}, "train": {"max_steps": 1}})
    assert run.objective.heads == {"vqa": {"num_answers": 7}}
    with pytest.raises(ConfigError, match=r"objective\.heads"):
        ObjectiveConfig(objectives=["mlm"], heads={"vqa": {"num_answers": 7}}).validate()


def test_every_flavor_belongs_to_one_model_family():
    from eve_ds.models.config import FLAVORS
    from eve_ds.train.config import MODEL_FLAVORS, load_config
    from eve_ds.train.family import FAMILIES, EVEFamily, EVLMFamily, ModelFamily, family_of, register_family

    assert family_of(load_config("eve_tiny_synthetic")).name == "eve"
    assert {f.name for f in FAMILIES.values() for fl in FLAVORS if fl in f.flavors} == {"eve"}
    for flavor in MODEL_FLAVORS:  # every flavor a config can name has exactly one family
        assert sum(flavor in f.flavors for f in FAMILIES.values()) == 1, flavor

    class Clash(ModelFamily):
        name, flavors = "clash", ("eve_tiny",)

    with pytest.raises(ValueError, match="already belong to 'eve'"):
        register_family(Clash())
    assert set(FAMILIES) == {"eve", "evlm"} and isinstance(FAMILIES["eve"], EVEFamily)
    assert isinstance(FAMILIES["evlm"], EVLMFamily)


def test_pixel_decoder_output_and_mask():
    cfg = eve_tiny()
    model = build(cfg)
    dec_out = []
    model.objectives["mim_pixel"].decoder.register_forward_hook(lambda m, a, o: dec_out.append(o))
    model(make_batch(cfg), gen())
    assert dec_out[0].shape == (2, cfg.num_patches, 16 * 16 * 3)
    keep, restore, mask = mask_patches(2, 16, 0.75, torch.device("cpu"), gen(5))
    assert keep.shape == (2, 4) and mask.sum(1).tolist() == [12.0, 12.0]
    assert torch.equal(mask.gather(1, keep), torch.zeros(2, 4))
    # ids_restore puts visible patch j at position j of [visible; masked].
    assert torch.equal(restore.gather(1, keep), torch.arange(4).expand(2, -1))


# -- what the MSM losses may depend on ---------------------------------------------------------------


class FrozenInputs:
    """Calls the real encoder, but with the text ids / image of a reference batch: a change of the batch
    then changes only the targets the objective reads from it, not the encoder input."""

    def __init__(self, encoder, text_ids=None, image=None) -> None:
        self.encoder, self.text_ids, self.image = encoder, text_ids, image

    def __call__(self, image, text_ids, text_mask, **kw):
        image = self.image if self.image is not None else image
        text_ids = self.text_ids if self.text_ids is not None else text_ids
        return self.encoder(image, text_ids, text_mask, **kw)


def test_mlm_loss_depends_only_on_masked_targets():
    cfg = eve_tiny()
    model = build(cfg).eval()
    mlm = model.objectives["mlm"]
    batch = make_batch(cfg, B=2, L=16)
    masked_ids, mlm_mask = mask_text(batch["text_ids"], batch["text_mask"], 0.5, 103, gen(1))
    assert (masked_ids[mlm_mask] == 103).all() and mlm_mask.any(1).all()
    assert not mlm_mask[:, 0].any()  # [CLS] never masked
    encoder = FrozenInputs(model.encoder, text_ids=masked_ids)
    with torch.no_grad():
        ref = mlm(encoder, batch, gen(1))["mlm_loss"]
        # Change every real target that was not masked ([CLS], [SEP] included): loss unchanged.
        unmasked = batch["text_mask"].bool() & ~mlm_mask
        other = {**batch, "text_ids": torch.where(unmasked, batch["text_ids"] + 7, batch["text_ids"])}
        torch.testing.assert_close(mlm(encoder, other, gen(1))["mlm_loss"], ref, rtol=0, atol=0)
        # Change one masked target: the loss changes (the test can fail).
        pos = mlm_mask.nonzero()[0]
        ids = batch["text_ids"].clone()
        ids[pos[0], pos[1]] += 7
        assert mlm(encoder, {**batch, "text_ids": ids}, gen(1))["mlm_loss"] != ref
        # ...and without the frozen encoder input it is the real objective: the [MASK]ed ids reach it.
        real = mlm(model.encoder, batch, gen(1))["mlm_loss"]
    torch.testing.assert_close(real, ref, rtol=0, atol=0)


def patch_pixels(cfg, patches: list[tuple[int, int]]) -> torch.Tensor:
    """(B, C, H, W) mask, 1 on the pixels of the given (sample, patch index) pairs."""
    m = torch.zeros(2, cfg.in_chans, cfg.image_size, cfg.image_size)
    g, p = cfg.grid_size, cfg.patch_size
    for b, j in patches:
        r, c = divmod(j, g)
        m[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = 1
    return m


def test_mim_pixel_loss_ignores_visible_patch_targets():
    cfg = eve_tiny()
    model = build(cfg).eval()
    mim = model.objectives["mim_pixel"]
    batch = make_batch(cfg)
    keep, _, mask = mask_patches(2, cfg.num_patches, 0.75, torch.device("cpu"), gen(3))
    visible = patch_pixels(cfg, [(b, int(j)) for b in range(2) for j in keep[b]])
    encoder = FrozenInputs(model.encoder, image=batch["image"])
    with torch.no_grad():
        ref = mim(encoder, batch, gen(3))["mim_pixel_loss"]
        other = {**batch, "image": batch["image"] + 5.0 * visible}  # only visible patches' targets
        torch.testing.assert_close(mim(encoder, other, gen(3))["mim_pixel_loss"], ref, rtol=0, atol=0)
        masked_j = int(mask[0].nonzero()[0])
        other = {**batch, "image": batch["image"] + 5.0 * patch_pixels(cfg, [(0, masked_j)])}
        assert mim(encoder, other, gen(3))["mim_pixel_loss"] > ref + 1e-3
    # The loss is the mean squared error over masked patches only, computed by hand.
    with torch.no_grad():
        enc = model.encoder(batch["image"], batch["text_ids"], batch["text_mask"], keep_ids=keep)
        _, restore, _ = mask_patches(2, cfg.num_patches, 0.75, torch.device("cpu"), gen(3))
        pred = mim.decoder(enc.image, restore)
        err = (pred - patchify(batch["image"], cfg.patch_size)).pow(2).mean(-1)
    torch.testing.assert_close(ref, err[mask.bool()].mean())


def test_mim_encoder_never_sees_masked_patches():
    cfg = eve_tiny()
    model = build(cfg).eval()
    calls = record_encoder_calls(model)
    batch = make_batch(cfg)
    _, _, mask = mask_patches(2, cfg.num_patches, 0.75, torch.device("cpu"), gen(3))
    masked = patch_pixels(cfg, [(b, int(j)) for b in range(2) for j in mask[b].nonzero()[:, 0]])
    mim = model.objectives["mim_pixel"]
    with torch.no_grad():
        a = mim(model.encoder, batch, gen(3))
        b = mim(model.encoder, {**batch, "image": batch["image"] + 3.0 * masked}, gen(3))
    torch.testing.assert_close(calls[0].hidden, calls[1].hidden, rtol=0, atol=0)
    assert b["mim_pixel_loss"] > a["mim_pixel_loss"]


# -- soft router -------------------------------------------------------------------------------------


def small_moe(num_experts: int = 4, d: int = 16, drop_tokens: bool = False, seed: int = 0) -> ModalityMoE:
    torch.manual_seed(seed)
    moe = ModalityMoE(
        d,
        2 * d,
        num_experts,
        ep_size=1,
        top_k=2,
        drop_tokens=drop_tokens,
        capacity_factor=1.0,
        modality_routing=True,
        second_expert_sampling=False,
    )
    moe.init_experts(ep_rank=0, seed=seed, std=0.2)
    return moe


def test_modality_bias_changes_only_image_router_logits():
    moe = small_moe()
    gate = moe.gate
    x = torch.randn(10, 16)
    modality = torch.tensor([IMAGE] * 4 + [TEXT] * 6)
    with torch.no_grad():
        gate.modality_bias.normal_()
        before = gate.router_logits(x, modality)
        torch.testing.assert_close(before, (x + gate.modality_bias[modality]) @ gate.wg.weight.T)  # eq. 6
        gate.modality_bias[IMAGE] += torch.randn(16)
        after = gate.router_logits(x, modality)
    assert (after[:4] - before[:4]).abs().min() > 0  # every image logit moved
    torch.testing.assert_close(after[4:], before[4:], rtol=0, atol=0)
    # The routes of a real forward are the top-2 of these logits (the bias is applied in the forward too).
    with torch.no_grad():
        _, _, routes = moe(x, modality)
    assert torch.equal(routes[0].long(), after.argmax(1))
    assert torch.equal(routes.T.long().sort(1).values, after.topk(2, dim=1).indices.sort(1).values)


def skewed_gate(moe: ModalityMoE) -> None:
    """Router weights with which every token prefers expert 0, then expert 1 (for x[:, 0] > 0)."""
    with torch.no_grad():
        w = 0.01 * torch.randn_like(moe.gate.wg.weight)
        w[:, 0] = torch.tensor([10.0, 8.0, 0.0, -1.0])[: w.shape[0]]
        moe.gate.wg.weight.copy_(w)


def test_no_token_dropped_under_maximally_imbalanced_routing():
    moe = small_moe()
    skewed_gate(moe)
    T = 64
    x = torch.randn(T, 16)
    x[:, 0] = x[:, 0].abs() + 0.5
    modality = (torch.arange(T) % 2).long()
    with torch.no_grad():
        out, _, routes = moe(x, modality)
        logits = moe.gate.router_logits(x, modality)
        expert_out = torch.stack([e(x) for e in moe.local_experts])  # (E, T, D)
    assert (routes[0] == 0).all() and (routes[1] == 1).all()  # every token on the same two experts
    probs = logits.softmax(-1)
    w1, w2 = probs[:, 0] / (probs[:, 0] + probs[:, 1]), probs[:, 1] / (probs[:, 0] + probs[:, 1])
    torch.testing.assert_close(w1 + w2, torch.ones(T))
    torch.testing.assert_close(out, w1[:, None] * expert_out[0] + w2[:, None] * expert_out[1])
    assert (out.abs().sum(1) > 0).all()
    # Experts that identify themselves: expert g outputs e_g whatever x, so out[t] holds the two weights.
    with torch.no_grad():
        for g, e in enumerate(moe.local_experts):
            e.fc2.weight.zero_()
            e.fc2.bias.copy_(F.one_hot(torch.tensor(g), 16).float())
        ident, _, _ = moe(x, modality)
    assert ((ident[:, :4] > 0).sum(1) == 2).all()
    torch.testing.assert_close(ident[:, :4].sum(1), torch.ones(T))
    # Sanity of the setup: with DeepSpeed's capacity limit (drop_tokens=True) the same routing drops tokens.
    dropping = small_moe(drop_tokens=True)
    dropping.load_state_dict(moe.state_dict())
    with torch.no_grad():
        out_drop, _, routes_drop = dropping(x, modality)
    assert (routes_drop < 0).any() and (out_drop.abs().sum(1) == 0).any()


def test_deepspeed_l_aux_is_eq7_on_a_tiny_example():
    """Eq. 7 (α left out): N · Σ_i f_i · p_i, f_i = fraction of tokens whose first choice is expert i,
    p_i = mean router probability of expert i."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [4.0, 0.0, 1.0]])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    first = [max(range(3), key=row.__getitem__) for row in logits.tolist()]  # 0, 1, 2, 0
    f = [first.count(i) / 4 for i in range(3)]
    p = [sum(r[i] for r in probs) / 4 for i in range(3)]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p))
    l_aux = top2gating(logits.clone(), 1.0, 4, drop_tokens=False, top2_2nd_expert_sampling=False)[0]
    assert l_aux.item() == pytest.approx(expected, rel=1e-6)
    # Perfect balance gives 1, all tokens on one expert with certainty gives N.
    assert top2gating(torch.eye(3) * 50, 1.0, 4, drop_tokens=False, top2_2nd_expert_sampling=False)[
        0
    ].item() == pytest.approx(1.0, rel=1e-5)
    one = torch.tensor([[50.0, 0.0, 0.0]] * 4)
    assert top2gating(one, 1.0, 4, drop_tokens=False, top2_2nd_expert_sampling=False)[
        0
    ].item() == pytest.approx(3.0, rel=1e-5)


def hand_l_aux(call: dict, gate) -> torch.Tensor:
    logits = (call["x"].float() + gate.modality_bias[call["modality"]]) @ gate.wg.weight.T
    probs = logits.softmax(-1)
    E = probs.shape[1]
    f = F.one_hot(probs.argmax(-1), E).float().mean(0)
    return E * (f * probs.mean(0)).sum()


@pytest.mark.parametrize(("reduction", "divisor"), [("mean", 4), ("sum", 1)])
def test_aux_loss_combines_every_soft_router_call(reduction, divisor):
    """α times the mean (official code) or the sum of eq. 7 over the 4 soft-router calls of a step."""
    cfg = eve_tiny(num_soft_blocks=2)
    model = build(cfg, aux_loss_weight=0.01, aux_loss_reduction=reduction)
    gates = record_gate_calls(model)
    with torch.no_grad():
        out = model(make_batch(cfg), gen())
    assert [c["block"] for c in gates] == [2, 3, 2, 3]  # MLM pass, then MIM pass
    total = 0.0
    for c in gates:
        gate = model.encoder.blocks[c["block"]].ffn.moe.gate
        torch.testing.assert_close(c["l_aux"], hand_l_aux(c, gate))
        total = total + c["l_aux"]
    torch.testing.assert_close(out["aux_loss"], 0.01 * total / divisor)


@pytest.mark.parametrize("drop_tokens", [False, True])
def test_expert_load_matches_routes(drop_tokens):
    cfg = eve_tiny(num_soft_blocks=2, drop_tokens=drop_tokens, capacity_factor=0.25)
    model = build(cfg)
    gates = record_gate_calls(model)
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model(batch, gen())
    n_text = int(batch["text_mask"].sum())  # padding is never routed
    # capacity_factor only matters with drop_tokens=True: then routes over capacity are dropped (-1).
    assert any(bool((c["routes"] < 0).any()) for c in gates) == drop_tokens
    for b in cfg.soft_blocks:
        load = out[f"expert_load/block{b}"]
        assert load.shape == (2, 4)
        counts = torch.zeros(2, 4)
        for c in (c for c in gates if c["block"] == b):
            for k in range(2):
                kept = c["routes"][k] >= 0
                counts.index_put_(
                    (c["modality"][kept], c["routes"][k][kept]), torch.ones(int(kept.sum())), accumulate=True
                )
            assert (c["modality"] == TEXT).sum() == n_text
        if not drop_tokens:  # image: 2 routes x (1 + 16 patches + 1 + 4 visible) x 2 samples
            assert counts.sum(1).tolist() == [2 * 2 * (17 + 5), 2 * 2 * n_text]
            torch.testing.assert_close(load.sum(1), torch.ones(2))
        torch.testing.assert_close(load, counts / counts.sum(1, keepdim=True))


def test_init_experts_is_ep_invariant():
    """ep=2's local experts are ep=1's experts [2r, 2r+1]; every other weight is the same for any ep_size."""
    ep1 = dict(build(eve_tiny(), seed=7).named_parameters())
    for rank in (0, 1):
        model = build(eve_tiny(ep_size=2), seed=7)
        model.init_experts(rank)
        n_compared = 0
        for name, p in model.named_parameters():
            if ".deepspeed_experts." in name:
                head, tail = name.split(".deepspeed_experts.")
                i, rest = tail.split(".", 1)
                name = f"{head}.deepspeed_experts.{2 * rank + int(i)}.{rest}"
                n_compared += 1
            torch.testing.assert_close(p, ep1[name], rtol=0, atol=0, msg=name)
        assert n_compared == 2 * 4  # 2 local experts x (fc1, fc2) x (weight, bias)
    experts = dict(build(eve_tiny(), seed=7).encoder.blocks[3].ffn.moe.local_experts.named_parameters())
    assert not torch.equal(experts["0.fc1.weight"], experts["2.fc1.weight"])
    assert experts["0.fc1.weight"].std().item() == pytest.approx(0.02, rel=0.2)


# -- learning ----------------------------------------------------------------------------------------


def test_adamw_steps_reduce_the_loss():
    cfg = eve_tiny()
    model = build(cfg)
    batch = make_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for _ in range(30):
        out = model(batch, gen(0))  # same masks every step: a fixed problem to fit
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert out["mlm_acc"] > 0.5


def test_stacked_experts_equal_deepspeeds_loop():
    """model.expert_impl=stacked (two batched matmuls) computes DeepSpeed's per-expert loop: same loss
    and same gradients to 1e-5 in fp32, same state-dict names (the checkpoint layout does not change)."""
    cfg = eve_tiny()
    obj = ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    results = {}
    for impl in ("loop", "stacked"):
        torch.manual_seed(0)
        model = PretrainingModel(dataclasses.replace(cfg, expert_impl=impl), obj)
        if impl == "stacked":
            model.load_state_dict(results["loop"][2])
        out = model(make_batch(cfg, B=4), generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out["loss"].detach(), grads, model.state_dict())
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results["loop"], results["stacked"]
    assert state_a.keys() == state_b.keys()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(".experts." in n for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("with_ids", [False, True])
def test_relative_position_bias_equals_table_lookup(with_ids):
    """The index_select gather is BEiT's table[index], values and gradients (full grid and MIM subsets)."""
    from eve_ds.models.layers import RelativePositionBias

    rpb = RelativePositionBias(grid=4, num_heads=3)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    ids = torch.stack([torch.randperm(16)[:5] for _ in range(2)]) if with_ids else None
    bias = rpb(ids)
    index = rpb.relative_position_index
    if with_ids:
        full = torch.cat([ids.new_zeros(2, 1), ids + 1], dim=1)
        index = index[full[:, :, None], full[:, None, :]]
        ref = rpb.relative_position_bias_table[index].permute(0, 3, 1, 2)
    else:
        ref = rpb.relative_position_bias_table[index].permute(2, 0, 1)
    assert bias.shape == ref.shape
    torch.testing.assert_close(bias, ref, rtol=0, atol=0)
    w = torch.randn(ref.shape)
    (g,) = torch.autograd.grad((bias * w).sum(), rpb.relative_position_bias_table)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), rpb.relative_position_bias_table)
    torch.testing.assert_close(g, g_ref)


def test_sincos_position_embedding_is_maes_and_fixed():
    """model.pos_embed=sincos: MAE's 2-D table (x in the first half of the channels, y in the second, each
    [sin | cos] over dim / 4 frequencies), the image [CLS] at 0, and no optimizer ever moves it."""
    from eve_ds.models.eve import sincos_pos_embed_2d
    from eve_ds.train.engine import param_groups

    table = sincos_pos_embed_2d(8, 2)  # frequencies 1 and 1 / 100
    x, y = 1.0, 0.0  # patch 1 = row 0, column 1
    expected = [math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100)]
    expected += [math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
    torch.testing.assert_close(table[1], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2)

    cfg = eve_tiny(pos_embed="sincos")
    model = build(cfg)
    pos = model.encoder.pos_embed
    assert not pos.requires_grad and float(pos[0, 0].abs().max()) == 0.0
    torch.testing.assert_close(pos[0, 1:], sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size))
    grouped = {id(p) for g in param_groups(model, 0.05, 1e-3) for p in g["params"]}
    assert id(pos) not in grouped
    before = pos.detach().clone()
    opt = torch.optim.AdamW(param_groups(model, 0.05, 1e-3), lr=1e-3)
    model(make_batch(cfg), gen(0))["loss"].backward()
    opt.step()
    torch.testing.assert_close(pos, before, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"model\.pos_embed"):
        eve_tiny(pos_embed="rope")
