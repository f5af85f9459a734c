"""The official fine-tuning protocol as options: the whole-image geometry, the seeded augmentations, the head
LR multipliers, AdamW β2 and clipping, ITM's global negatives, and the paper configs that set them (the
tiny configs keep the centre square, no augmentation and local negatives)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.data.augment import OFFICIAL_OPS, apply_op, official_rand_augment
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.tasks.base import decode_image
from eve_ds.tasks.config import TaskConfig
from eve_ds.tasks.nlvr2.data import NLVR2Dataset, NLVR2Example
from eve_ds.tasks.retrieval.data import RetrievalImage, RetrievalImageDataset, RetrievalTrainDataset
from eve_ds.train.config import load_config
from eve_ds.train.engine import param_groups

RED, GREEN, BLUE, WHITE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128)


def corner_image(path, w: int = 64, h: int = 32) -> str:
    """A landscape image, grey, with a 6-pixel square of its own colour in each corner."""
    a = np.full((h, w, 3), GREY, dtype=np.uint8)
    for (y, x), c in {(0, 0): RED, (0, w - 6): GREEN, (h - 6, 0): BLUE, (h - 6, w - 6): WHITE}.items():
        a[y : y + 6, x : x + 6] = c
    Image.fromarray(a).save(path)
    return str(path)


def gradient_image(path, w: int = 96, h: int = 48) -> str:
    """Red rising left to right, green top to bottom: every crop of it looks different."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    Image.fromarray(np.stack([x, y, np.full_like(x, 64)], -1).astype(np.uint8)).save(path)
    return str(path)


def corners(a: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in a[y, x]) for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1))]


def test_official_evaluation_keeps_the_whole_image_square_crop_the_centre(tmp_path):
    path = corner_image(tmp_path / "wide.png")
    whole = decode_image(path, 16, "official")
    assert whole.shape == (16, 16, 3) and whole.dtype == np.uint8
    # Every corner's colour survives the 64 x 32 -> 16 x 16 resize (bicubic may ring by a few levels).
    for got, want in zip(corners(whole), (RED, GREEN, BLUE, WHITE)):
        assert np.abs(np.array(got) - np.array(want)).max() <= 8, (got, want)
    centre = decode_image(path, 16, "square_crop")  # x 16..48 of 64: the corner squares are cut away
    assert set(corners(centre)) == {GREY}
    # Evaluation never draws anything: the same with or without an augmentation name.
    assert np.array_equal(decode_image(path, 16, "official", augment="randaugment"), whole)


def test_square_crop_without_augmentation_is_the_same_in_training_and_evaluation(tmp_path):
    path = corner_image(tmp_path / "wide.png")
    evaluation = decode_image(path, 16)
    assert np.array_equal(decode_image(path, 16, "square_crop", augment="none", seed=123), evaluation)
    assert np.array_equal(
        RetrievalImageDataset([RetrievalImage(0, path, ("a",))], 16)[0]["image"], evaluation
    )


def test_official_training_crop_is_a_random_resized_crop_of_the_whole_image(tmp_path):
    smooth = gradient_image(tmp_path / "gradient.png", w=64, h=48)  # 4:3, as COCO
    crops = [decode_image(smooth, 16, "official", seed=s) for s in range(12)]
    assert all(c.shape == (16, 16, 3) for c in crops)
    assert np.array_equal(crops[0], decode_image(smooth, 16, "official", seed=0))  # one seed, one crop
    assert len({c.tobytes() for c in crops}) == len(crops)  # each seed its own crop
    path = corner_image(tmp_path / "wide.png", w=96, h=48)
    crops = [decode_image(path, 16, "official", seed=s) for s in range(12)]
    # A crop of at least half the area lands on the whole image's content, not only on its centre square:
    # over 12 draws some corner colour shows up.
    assert any(set(corners(c)) - {GREY} for c in crops)


def _pairs_dataset(path: str, **kw) -> RetrievalTrainDataset:
    images = [RetrievalImage(i, path, (f"caption {i}",)) for i in range(4)]
    return RetrievalTrainDataset(images, 16, train=True, hflip=0.0, seed=7, geometry="official", **kw)


@pytest.mark.parametrize("augment", ["randaugment", "color_jitter"])
def test_augmentation_is_seeded_per_seed_epoch_and_item(tmp_path, augment):
    path = gradient_image(tmp_path / "gradient.png")
    ds = _pairs_dataset(path, augment=augment)
    state = torch.get_rng_state()
    epoch0 = [ds[i]["image"] for i in range(4)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    again = _pairs_dataset(path, augment=augment)  # another worker, or a resumed run
    assert all(np.array_equal(a, again[i]["image"]) for i, a in enumerate(epoch0))
    assert len({a.tobytes() for a in epoch0}) == 4  # one image, four items: four draws
    ds.set_epoch(1)
    assert not any(np.array_equal(a, ds[i]["image"]) for i, a in enumerate(epoch0))
    ds.set_epoch(0)
    assert all(np.array_equal(a, ds[i]["image"]) for i, a in enumerate(epoch0))
    other = RetrievalTrainDataset(
        [RetrievalImage(i, path, (f"caption {i}",)) for i in range(4)],
        16,
        train=True,
        seed=8,
        geometry="official",
        augment=augment,
    )
    assert not np.array_equal(other[0]["image"], epoch0[0])
    # The same crops without the augmentation: the augmentation changed the pixels (RandomAugment leaves
    # about a third of the images as they are: each of its two operations applies with p = 0.5).
    plain = _pairs_dataset(path)
    assert sum(not np.array_equal(plain[i]["image"], a) for i, a in enumerate(epoch0)) >= 2


def test_nlvr2_images_of_one_item_get_their_own_draws(tmp_path):
    path = gradient_image(tmp_path / "gradient.png")
    ex = NLVR2Example("dev-1-0-0", "two dogs", 1, path, path)
    ds = NLVR2Dataset([ex], 16, train=True, geometry="official", augment="randaugment", seed=3)
    image = ds[0]["image"]
    assert image.shape == (2, 16, 16, 3) and not np.array_equal(image[0], image[1])
    assert np.array_equal(
        NLVR2Dataset([ex], 16, train=True, geometry="official", augment="randaugment", seed=3)[0]["image"],
        image,
    )
    evaluation = NLVR2Dataset([ex], 16, train=False, geometry="official", augment="randaugment")[0]["image"]
    assert np.array_equal(evaluation[0], evaluation[1])
    assert np.array_equal(evaluation[0], decode_image(path, 16, "official"))


def test_bad_geometry_or_augment_names_the_key():
    for key, value in (("image_geometry", "centre"), ("image_augment", "autoaugment")):
        with pytest.raises(ValueError, match=f"task.{key}"):
            TaskConfig(name="vqa", synthetic=True, **{key: value}).validate()


# name -> (head LR multiplier, augmentation, clipping): the official code's values
PAPER = {
    "vqa_eve_base": (10.0, "randaugment", 3.0),
    "vqa_eve_large": (10.0, "randaugment", 3.0),
    "nlvr2_eve_base": (15.0, "randaugment", 3.0),
    "nlvr2_eve_large": (15.0, "randaugment", 3.0),
    "retrieval_coco_eve_base": (10.0, "color_jitter", 1.0),
    "retrieval_coco_eve_large": (10.0, "color_jitter", 1.0),
    "retrieval_flickr_eve_base": (5.0, "color_jitter", 1.0),
    "retrieval_flickr_eve_large": (5.0, "color_jitter", 1.0),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_set_the_official_protocol(name):
    cfg = load_config(name)
    mult, augment, clip = PAPER[name]
    assert (cfg.task.head_lr_mult, cfg.task.image_augment, cfg.optim.grad_clip) == (mult, augment, clip)
    assert cfg.task.image_geometry == "official" and cfg.optim.betas == [0.9, 0.98]
    assert cfg.objective.itm_negatives == ("global" if name.startswith("retrieval") else "local")


@pytest.mark.parametrize("name", ["vqa_tiny_synthetic", "retrieval_tiny_synthetic", "nlvr2_tiny_synthetic"])
def test_tiny_configs_keep_the_centre_square_and_no_augmentation(name):
    cfg = load_config(name)
    assert (cfg.task.image_geometry, cfg.task.image_augment) == ("square_crop", "none")
    assert cfg.objective.itm_negatives == "local"


@pytest.mark.parametrize("name", ["nlvr2_eve_base", "retrieval_flickr_eve_base"])
def test_the_paper_configs_head_multiplier_lands_in_the_param_groups(name):
    cfg = load_config(name)
    objective = "nlvr2" if name.startswith("nlvr2") else "itc"
    objectives = ["nlvr2"] if objective == "nlvr2" else ["itc", "itm"]
    model = PretrainingModel(get_config("eve_tiny"), ObjectiveConfig(objectives=objectives))
    o = cfg.optim
    groups = {g["name"]: g for g in param_groups(model, o.weight_decay, o.lr, cfg.task.head_lr_mult)}
    assert groups["decay"]["lr"] == o.lr
    assert groups["decay_head"]["lr"] == pytest.approx(o.lr * PAPER[name][0])
    assert groups["no_decay_head"]["lr"] == pytest.approx(o.lr * PAPER[name][0])
    head = {id(p) for p in model.objectives.parameters()}
    assert {id(p) for p in groups["decay_head"]["params"] + groups["no_decay_head"]["params"]} == head


def _scene(size: int = 32) -> Image.Image:
    """A red square on a blue background: colours that torchvision's RandAugment would alter."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[...] = (20, 40, 200)
    arr[8:20, 10:22] = (220, 30, 30)
    return Image.fromarray(arr)


@pytest.mark.parametrize("name", OFFICIAL_OPS)
def test_official_randaugment_operations_never_change_a_colour(name):
    """Every operation of the release's RandomAugment keeps hues: the red stays red, the blue blue (only
    brightness, contrast stretches and grey fill move the values)."""
    out = np.asarray(apply_op(_scene(), name, 7, random.Random(0))).astype(int)
    red = (out[..., 0] > 2 * out[..., 2]) & (out[..., 0] > 2 * out[..., 1])
    blue = out[..., 2] > 2 * out[..., 0]
    grey = np.ptp(out, axis=-1) < 8  # the affine operations' fill
    assert red.sum() > 0 and blue.sum() > 0
    assert (red | blue | grey).mean() > 0.9  # bilinear edges are the rest


def test_official_randaugment_magnitudes():
    """ALBEF's level tables at M = 7: brightness x1.36; a shift of 7 pixels; shear 0.21."""
    img = Image.fromarray(np.full((16, 16, 3), 100, np.uint8))
    assert np.asarray(apply_op(img, "Brightness", 7, random.Random(0)))[0, 0, 0] == 136
    ramp = np.zeros((8, 32, 3), np.uint8)
    ramp[:, 12] = 255  # one bright column
    moved = np.asarray(apply_op(Image.fromarray(ramp), "TranslateX", 7, random.Random(0)))
    assert int(np.argmax(moved[0, :, 0])) in (12 - 7, 12 + 7)
    with pytest.raises(ValueError, match="unknown augmentation operation 'Color'"):
        apply_op(img, "Color", 7, random.Random(0))


def test_official_randaugment_is_a_function_of_its_seed():
    img = _scene()
    a = official_rand_augment(img, random.Random(5))
    b = official_rand_augment(img, random.Random(5))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # Two ops, each applied with p = 0.5: over many seeds some images stay unchanged (~25%), most do not.
    same = sum(
        np.array_equal(np.asarray(official_rand_augment(img, random.Random(s))), np.asarray(img))
        for s in range(200)
    )
    assert 0.2 * 200 < same < 0.5 * 200  # p(unchanged) = 0.25 + p(identity-like draws)
