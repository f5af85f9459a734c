"""Configuration of the image-text input pipeline (the `data:` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from eve_ds.utils.config import check

HFLIP_TEXT_CHOICES = ("swap", "skip", "ignore")


@dataclass
class CorpusConfig:
    """One training corpus and how often it is sampled.

    `shards`: a directory holding `manifest.json` and the shards it lists (every shard is read), or a
    brace spec ("dir/shard-{000000..000099}.tar"); a spec that leaves out shards of the manifest next to
    them is an error unless `subset` is true. `manifest` is only needed when the shards are not local
    files (e.g. `pipe:` URLs). Corpora are mixed as a union: a corpus is drawn in proportion to its number
    of pairs times `weight` (weight 2 = seen twice as often as its size says).
    """

    name: str
    shards: str
    weight: float = 1.0
    manifest: str | None = None
    subset: bool = False


@dataclass
class DataConfig:
    train: list[CorpusConfig] = field(default_factory=list)  # may be empty when synthetic is used
    val: str | None = None  # brace spec of validation shards
    synthetic: bool = False  # generate the synthetic corpus into cache_dir when missing and use it
    cache_dir: str = "~/.cache/eve_ds"
    synthetic_num_train: int = 20000
    synthetic_num_val: int = 1000
    synthetic_seed: int = 0
    tokenizer: str = "bert-base-uncased"  # the packaged folder for this name, else a local path
    num_workers: int = 2
    shuffle_buffer: int = 1000  # per shard visit; >= samples per shard means a full permutation
    crop_scale: tuple[float, float] | list[float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] | list[float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    # Flipping swaps left and right in the image. "swap": swap the words "left"/"right" in the caption
    # too; "skip": never flip a sample whose caption says left or right; "ignore": flip regardless
    # (the paper's plain augmentation, which makes spatial captions wrong half the time).
    hflip_text: str = "swap"
    # Per-channel normalisation of the model's input images; null = ImageNet's (timm's constants). The
    # official EVE release normalises with mean = std = 0.5.
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self) -> None:
        self.train = [c if isinstance(c, CorpusConfig) else CorpusConfig(**c) for c in self.train]
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        self.validate()

    def validate(self) -> None:
        names = [c.name for c in self.train]
        check(len(set(names)) == len(names), "data.train", names, "unique corpus names")
        for c in self.train:
            check(c.weight > 0, f"data.train[{c.name}].weight", c.weight, "> 0")
            check(bool(c.shards), f"data.train[{c.name}].shards", c.shards, "a shard directory or brace spec")
        check(self.synthetic_num_train > 0, "data.synthetic_num_train", self.synthetic_num_train, "> 0")
        check(self.synthetic_num_val > 0, "data.synthetic_num_val", self.synthetic_num_val, "> 0")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, ">= 1")
        check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "data.crop_scale",
            list(self.crop_scale),
            "[lo, hi] with 0 < lo <= hi <= 1",
        )
        check(
            len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            "data.crop_ratio",
            list(self.crop_ratio),
            "[lo, hi] with 0 < lo <= hi",
        )
        for key in ("image_mean", "image_std"):
            v = getattr(self, key)
            check(v is None or len(v) == 3, f"data.{key}", v, "null or 3 numbers (R, G, B)")
        check(not self.image_std or min(self.image_std) > 0, "data.image_std", self.image_std, "> 0")
        check(0.0 <= self.hflip <= 1.0, "data.hflip", self.hflip, "a probability in [0, 1]")
        check(
            self.hflip_text in HFLIP_TEXT_CHOICES,
            "data.hflip_text",
            self.hflip_text,
            f"one of {list(HFLIP_TEXT_CHOICES)}",
        )
