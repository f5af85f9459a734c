"""`msm_joint` (EVE Table 5, †): one encoder pass with the text and the image masked together, MLM and pixel
MIM from that pass, the ratios from the config."""

from __future__ import annotations

import pytest
import torch

from eve_ds.models.config import eve_tiny
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.masking import maskable_text_positions
from eve_ds.utils.config import ConfigError
from eve_ds.utils.image import normalize_image

MASK = 103


def batch(lengths: list[int], L: int = 16, size: int = 64) -> dict:
    """Captions of the given real lengths (ids 1000+, never [MASK]), padded to L; random uint8 images."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1000, 2000, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    pixels = torch.randint(0, 256, (len(lengths), 3, size, size), dtype=torch.uint8, generator=g)
    return {"image": normalize_image(pixels), "pixels": pixels, "text_ids": ids, "text_mask": mask}


def model(text_ratio: float, image_ratio: float) -> PretrainingModel:
    torch.manual_seed(0)
    obj = ObjectiveConfig(
        objectives=["msm_joint"], text_mask_ratio=text_ratio, joint_image_mask_ratio=image_ratio
    )
    return PretrainingModel(eve_tiny(), obj)


@pytest.mark.parametrize("text_ratio,image_ratio", [(0.5, 0.5), (0.25, 0.75)])
def test_one_pass_masks_both_modalities_with_the_given_ratios(text_ratio, image_ratio):
    m = model(text_ratio, image_ratio)
    calls = []
    m.encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    b = batch([12, 7, 16])
    out = m(b, generator=torch.Generator().manual_seed(1))

    assert len(calls) == 1  # one encoder pass for both losses
    (image, ids, _), kwargs = calls[0]
    n_maskable = maskable_text_positions(b["text_mask"]).sum(1)  # [10, 5, 14]
    want_text = torch.clamp(torch.round(n_maskable * text_ratio), min=1).long()
    assert torch.equal((ids == MASK).sum(1), want_text)
    assert torch.equal(ids[ids != MASK], b["text_ids"][ids != MASK])  # nothing else changed
    assert len(out["mlm_target"]) == int(want_text.sum())
    P = eve_tiny().num_patches  # 16
    keep = kwargs["keep_ids"]
    assert keep.shape == (3, int(P * (1 - image_ratio)))  # the other patches were dropped
    assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)  # distinct patches
    assert kwargs.get("patch_mask") is None and image.shape == (3, 3, 64, 64)


def test_mlm_and_mim_pixel_losses_exist_and_backprop_to_their_heads_and_the_encoder():
    m = model(0.5, 0.5)
    out = m(batch([12, 7, 16]), generator=torch.Generator().manual_seed(1))
    assert {"mlm_loss", "mim_pixel_loss", "aux_loss", "loss"} <= out.keys()
    assert out["mlm_loss"].detach() > 0 and out["mim_pixel_loss"].detach() > 0
    assert torch.isclose(out["loss"], out["mlm_loss"] + out["mim_pixel_loss"] + out["aux_loss"])
    out["loss"].backward()
    params = dict(m.named_parameters())
    for name in (
        "objectives.msm_joint.mlm.head.decoder.weight",
        "objectives.msm_joint.mim.decoder.pred.weight",
        "encoder.patch_embed.proj.weight",
        "encoder.word_embed.weight",
    ):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


@torch.no_grad()
def test_mim_pixel_loss_is_over_the_dropped_patches_only():
    """The pixel target (`pixels`) is changed, the encoder's input (`image`) is not: inverting the target on
    the patches that entered the encoder leaves the loss as it was; on the dropped ones it changes it."""
    m = model(0.5, 0.5).eval()
    b = batch([12, 7, 16])
    kept = []
    m.encoder.register_forward_pre_hook(lambda mod, args, kw: kept.append(kw["keep_ids"]), with_kwargs=True)
    ref = m(b, generator=torch.Generator().manual_seed(1))["mim_pixel_loss"]

    def target_inverted(patches: list[int]) -> dict:
        px = b["pixels"].clone()  # image 0, 4 x 4 grid of 16 px patches
        for p in patches:
            r, c = divmod(p, 4)
            px[0, :, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] ^= 255
        return dict(b, pixels=px)

    visible = kept[0][0].tolist()
    dropped = [p for p in range(16) if p not in visible]
    same = m(target_inverted(visible), generator=torch.Generator().manual_seed(1))["mim_pixel_loss"]
    other = m(target_inverted(dropped), generator=torch.Generator().manual_seed(1))["mim_pixel_loss"]
    assert float(same) == float(ref)
    assert abs(float(other) - float(ref)) > 1e-3


def test_joint_image_mask_ratio_is_validated():
    with pytest.raises(ConfigError, match=r"objective\.joint_image_mask_ratio=1\.0"):
        ObjectiveConfig(objectives=["msm_joint"], joint_image_mask_ratio=1.0).validate()
    assert ObjectiveConfig().joint_image_mask_ratio == 0.5
