"""Configuration of the image-text input pipeline (the `data:` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field

HFLIP_TEXT_CHOICES = ("swap", "skip", "ignore")


@dataclass
class CorpusConfig:
    """One training corpus: a brace-expanded shard list with a sampling weight.

    `manifest` is only needed when the shards are not local files (e.g. `pipe:` URLs); by default
    `manifest.json` is looked up next to the first shard.
    """

    name: str
    shards: str
    weight: float = 1.0
    manifest: str | None = None


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

    def __post_init__(self) -> None:
        self.train = [c if isinstance(c, CorpusConfig) else CorpusConfig(**c) for c in self.train]
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"data config: {msg}")

        need(
            self.synthetic or len(self.train) > 0,
            "train must list at least one corpus when synthetic is false",
        )
        names = [c.name for c in self.train]
        need(len(set(names)) == len(names), f"train corpus names must be unique, got {names}")
        for c in self.train:
            need(c.weight > 0, f"train[{c.name}].weight={c.weight} must be > 0")
            need(bool(c.shards), f"train[{c.name}].shards must be a non-empty brace spec")
        need(self.synthetic_num_train > 0, f"synthetic_num_train={self.synthetic_num_train} must be > 0")
        need(self.synthetic_num_val > 0, f"synthetic_num_val={self.synthetic_num_val} must be > 0")
        need(self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0")
        need(self.shuffle_buffer >= 1, f"shuffle_buffer={self.shuffle_buffer} must be >= 1")
        need(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            f"crop_scale={list(self.crop_scale)} must be [lo, hi] with 0 < lo <= hi <= 1",
        )
        need(
            len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            f"crop_ratio={list(self.crop_ratio)} must be [lo, hi] with 0 < lo <= hi",
        )
        need(0.0 <= self.hflip <= 1.0, f"hflip={self.hflip} must be a probability in [0, 1]")
        need(
            self.hflip_text in HFLIP_TEXT_CHOICES,
            f"hflip_text={self.hflip_text!r} must be one of {list(HFLIP_TEXT_CHOICES)}",
        )
