"""The run configuration: one typed tree of dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("eve_base_4m", ["optim.lr=2e-4", "model.ep_size=8"])

Every key is checked on load: an unknown key is reported with the nearest valid ones, a bad value with
the allowed values or range. ``model`` takes a ``flavor`` (eve_tiny / eve_base / eve_large) whose
defaults the other model keys override.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eve_ds.data.config import DataConfig
from eve_ds.models.config import FLAVORS, EVEConfig, get_config
from eve_ds.objectives import ObjectiveConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (paper Sec. 4.1)."""

    lr: float = 5e-4  # peak; 5e-4 for base, 2e-4 for large
    min_lr: float = 1e-6  # end of the cosine
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.05  # not applied to biases, norms, embeddings/tokens, layer scale, router bias
    warmup_steps: int = 10_000
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    grad_clip: float = 3.0  # 0 disables clipping


@dataclass
class TrainConfig:
    max_steps: int = 480_000  # defines the schedule
    stop_after: int | None = None  # end this run after this step (with a checkpoint), schedule unchanged
    global_batch_size: int = 2048  # = micro_batch_size x grad accumulation x data-parallel world size
    micro_batch_size: int = 128  # per rank
    seed: int = 0
    ds_config: str = "zero2_bf16"  # a name in ds_configs/ or a path: ZeRO / precision / communication
    checkpoint_every: int = 5000
    keep_last: int = 3
    eval_every: int = 10_000
    eval_batches: int = 50  # per rank; 0 = the whole validation set
    log_every: int = 50
    init_from: str | None = None  # a BEiT v2 checkpoint (timm format) or a native EVE export
    grad_checkpointing: bool = False
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    dist_timeout_s: int = 600  # a collective that waits this long on a dead rank fails the run
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled (online falls back to offline without an API key)
    project: str = "eve-ds"
    name: str | None = None
    entity: str | None = None


@dataclass
class RunConfig:
    model: EVEConfig = field(default_factory=EVEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    model_flavor: str = "eve_base"
    name: str = "eve"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"flavor": d.pop("model_flavor"), **d["model"]}
        return d

    def validate(self) -> None:
        t, o = self.train, self.optim
        _check(t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1")
        _check(t.stop_after is None or t.stop_after >= 1, "train.stop_after", t.stop_after, ">= 1 or null")
        _check(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, ">= 1")
        _check(t.global_batch_size >= 1, "train.global_batch_size", t.global_batch_size, ">= 1")
        for key in ("checkpoint_every", "eval_every", "log_every", "keep_last", "max_nonfinite_steps"):
            _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), ">= 1")
        _check(t.device in ("auto", "cpu", "cuda"), "train.device", t.device, "one of auto, cpu, cuda")
        _check(o.lr > 0, "optim.lr", o.lr, "> 0")
        _check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"in [0, optim.lr={o.lr}]")
        _check(
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "optim.betas",
            o.betas,
            "two values in [0, 1)",
        )
        _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
        _check(
            o.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            o.schedule,
            "one of cosine, linear, constant",
        )
        _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        _check(
            self.wandb.mode in ("online", "offline", "disabled"),
            "wandb.mode",
            self.wandb.mode,
            "one of online, offline, disabled",
        )
        self.model.validate()
        self.objective.validate()
        self.data.validate()


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


# -- loading --------------------------------------------------------------------------------------------


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown config {name_or_path!r}: not a file and not one of {names}")
    return packaged


def load_config(name_or_path: str = "eve_tiny_synthetic", overrides: list[str] | None = None) -> RunConfig:
    """Packaged config name or YAML path, then `key=value` dotted overrides -> validated RunConfig."""
    path = resolve_config_path(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value` (value parsed as YAML: numbers, lists, null) into the nested dict `raw`."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def from_dict(raw: dict) -> RunConfig:
    raw = dict(raw)
    model = dict(raw.pop("model", None) or {})
    flavor = model.pop("flavor", raw.pop("model_flavor", "eve_base"))
    if flavor not in FLAVORS:
        raise ConfigError(f"model.flavor={flavor!r} is invalid: expected one of {sorted(FLAVORS)}")
    _reject_unknown(model, EVEConfig, "model", extra=("flavor",))
    hints = typing.get_type_hints(EVEConfig)
    model = {k: _coerce(hints[k], v, f"model.{k}") for k, v in model.items()}
    try:
        model_cfg = get_config(flavor, **model)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    sections = {
        "objective": ObjectiveConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "wandb": WandbConfig,
    }
    _reject_unknown(raw, RunConfig, "", extra=())
    kwargs: dict[str, Any] = {"model": model_cfg, "model_flavor": flavor, "name": raw.get("name", "eve")}
    for key, cls in sections.items():
        kwargs[key] = _build(cls, raw.get(key) or {}, key)
    _expand_data_paths(kwargs["data"])
    cfg = RunConfig(**kwargs)
    try:
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return cfg


def _expand_data_paths(data: DataConfig) -> None:
    """Environment variables (e.g. ${EVE_DATA_ROOT}) and ~ in shard specs and the cache directory."""

    def expand(value: str, key: str) -> str:
        out = os.path.expanduser(os.path.expandvars(value))
        if "$" in out:
            raise ConfigError(f"{key}={value!r} uses an environment variable that is not set")
        return out

    for c in data.train:
        c.shards = expand(c.shards, f"data.train[{c.name}].shards")
    if data.val:
        data.val = expand(data.val, "data.val")
    data.cache_dir = expand(data.cache_dir, "data.cache_dir")


def _reject_unknown(d: dict, cls: type, prefix: str, extra: tuple[str, ...]) -> None:
    valid = [f.name for f in dataclasses.fields(cls)] + list(extra)
    for key in d:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            where = f"{prefix}.{key}" if prefix else key
            hint = (
                f"; did you mean {', '.join((prefix + '.' if prefix else '') + n for n in near)}?"
                if near
                else ""
            )
            raise ConfigError(f"unknown config key {where!r}{hint} (valid: {', '.join(sorted(valid))})")


def _build(cls: type, d: dict, prefix: str) -> Any:
    """Dataclass `cls` from dict `d`, recursing into nested dataclasses and lists of them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {d!r}")
    _reject_unknown(d, cls, prefix, extra=())
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(hints[f.name], d[f.name], f"{prefix}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}: {e}") from e


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int/float/str/bool/list/Optional/dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}={value!r} is invalid")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is invalid: expected a string")
        return value
    return value


def save_config(cfg: RunConfig, path: Path) -> None:
    from eve_ds.train.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
