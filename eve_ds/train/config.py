"""The run configuration: one typed tree of dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("eve_base_4m", ["optim.lr=2e-4", "model.ep_size=8"])

Every key is checked on load: an unknown key is reported with the nearest valid ones, a bad value with
the allowed values or range. ``model`` takes a ``flavor`` whose defaults the other model keys override;
the flavor also picks the model family's config class (`MODEL_FLAVORS`: eve_tiny / eve_base / eve_large
build an `EVEConfig`, evlm_tiny / evlm_14b and their MoE variants an `EVLMConfig`).

What the run derives from the loaded config (micro-batch, accumulation, warm-up steps, step count, the
task's head options) is computed once, by `resolve`, into a new RunConfig: that is what runs and what the
run directory's `config.yaml` records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eve_ds.data.config import DataConfig
from eve_ds.models.config import FLAVORS, EVEConfig, get_config
from eve_ds.models.evlm.config import FLAVORS as EVLM_FLAVORS
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.models.evlm.config import get_config as get_evlm_config
from eve_ds.objectives import ObjectiveConfig
from eve_ds.objectives.base import upgrade_saved_objective
from eve_ds.tasks.base import Task, TaskContext
from eve_ds.tasks.config import CORPUS_TASKS, TaskConfig
from eve_ds.utils.config import ConfigError, apply_override, check
from eve_ds.utils.io import atomic_write_text
from eve_ds.utils.paths import ds_config_dir

COMPILE_BACKENDS = ("inductor", "aot_eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(cfg: RunConfig) -> None:
    """train.compile=blocks compiles EVE's encoder blocks, without activation checkpointing around them."""
    t = cfg.train
    check(t.compile is False or t.compile == "blocks", "train.compile", t.compile, "false or blocks")
    allowed = COMPILE_BACKENDS
    check(
        t.compile_backend in allowed,
        "train.compile_backend",
        t.compile_backend,
        "one of " + ", ".join(allowed),
    )
    check(
        t.compile_mode in COMPILE_MODES,
        "train.compile_mode",
        t.compile_mode,
        "one of " + ", ".join(COMPILE_MODES),
    )
    check(
        t.compile_mode == "default" or t.compile_backend == "inductor",
        "train.compile_mode",
        t.compile_mode,
        f"default with train.compile_backend={t.compile_backend} (modes are Inductor's)",
    )
    if t.compile is False:
        return
    check(
        isinstance(cfg.model, EVEConfig),
        "train.compile",
        t.compile,
        "false for an EVLM model (blocks compiles EVE's encoder blocks)",
    )
    check(not t.grad_checkpointing, "train.compile", t.compile, "false with train.grad_checkpointing=true")


logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE_DIR / "configs"  # run configs, package data
DS_CONFIG_DIR = ds_config_dir()  # DeepSpeed configs: top-level ds_configs/, package data in a wheel

# Flavor -> (its family's model config class, the factory that applies overrides to the flavor's defaults).
# The class decides which `model.*` keys a config may set; `train/family.py` maps the flavor to the rest.
MODEL_FLAVORS: dict[str, tuple[type, Any]] = {
    **{name: (EVEConfig, get_config) for name in FLAVORS},
    **{name: (EVLMConfig, get_evlm_config) for name in EVLM_FLAVORS},
}


@dataclass
class OptimConfig:
    """AdamW, linear warm-up, then cosine decay. Sources: [paper] Sec. 4.1 / appendix of EVE; [ours] a
    choice of this project (reason given); [BEiT] / [MAE] taken from those recipes."""

    lr: float = 5e-4  # [paper] peak LR, Base 5e-4 (Large: 2e-4, in its config)
    min_lr: float = 1e-6  # [ours] floor of the cosine; the paper says "cosine decay" only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # [paper]
    eps: float = 1e-8  # [ours] PyTorch's AdamW default
    weight_decay: float = 0.05  # [paper] value; which parameters are exempt: [BEiT/MAE] (train/engine.py)
    warmup_steps: int = 10_000  # [paper]
    warmup_ratio: float | None = None  # fraction of train.max_steps; replaces warmup_steps when set
    schedule: str = "cosine"  # [paper] cosine | linear | constant (after warm-up)
    grad_clip: float = 3.0  # [BEiT] 3.0; not stated in the paper; 0 disables clipping
    # A late-joining parameter set in the one schedule (EVLM stage 1: the latter half of the ViT after the
    # first 25 % of the steps): the trainable parameters whose names match a glob of `phase_params` get LR
    # factor 0 before step round(phase_start x train.max_steps), the shared schedule's factor from then on.
    phase_start: float | None = None
    phase_params: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    max_steps: int | None = 480_000  # [paper] Base, 4M corpus; defines the schedule (null: task.epochs)
    stop_after: int | None = None  # end this run after this step (with a checkpoint), schedule unchanged
    global_batch_size: int = 2048  # [paper] = micro-batch x grad accumulation x data-parallel world size
    micro_batch_size: int = 128  # [ours] per rank; adapted down to fit the layout (`resolve`)
    # Derived by `resolve`: global batch / (micro-batch x world size); a value given is recomputed.
    grad_accum_steps: int | None = None
    seed: int = 0
    ds_config: str = "zero2_bf16"  # a name in ds_configs/ or a JSON path: ZeRO, precision, comms
    checkpoint_every: int = 5000
    keep_last: int = 3
    eval_every: int = 10_000
    eval_batches: int = 50  # per rank; 0 = the whole validation set
    log_every: int = 50
    # Initial weights: a BEiT v2 checkpoint (timm format, or its `eve-convert import-beitv2` export), a
    # native EVE export, a run dir or a DeepSpeed tag dir; "none" = from scratch. `${VAR}` is expanded.
    # [paper] EVE starts from BEiT v2: the packaged base/large configs require it (see `init_problem`).
    init_from: str | None = None
    grad_checkpointing: bool = False
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    # (ours) Where a micro-batch's loss is tested for inf/nan. "device": on the device, read once per log
    # interval (no host sync per micro-batch); a non-finite loss turns the step's gradients into NaN, so the
    # optimizer skips the whole update on the device (skipped_updates). "host": read after each forward
    # (a sync), and the micro-batch is replaced by the next one. Finite runs are the same, bit for bit.
    nonfinite_check: str = "device"
    # (ours) How DeepSpeed's ZeRO-1/2 step takes the gradient norm: "deepspeed", its loop of 2 ops per
    # gradient tensor; "foreach", one torch._foreach_norm over all parameter groups (the same norm to
    # float precision, not always bit for bit: another reduction kernel on CUDA). Both without host reads.
    zero_grad_norm: str = "deepspeed"
    # (ours) torch.compile: false (off), or "blocks": each encoder block without host syncs compiled on its
    # own (fullgraph, static shapes; eve_ds/train/compile.py), training captions padded to model.max_text_len.
    compile: bool | str = False
    # (ours) pad every training batch's captions to model.max_text_len (one text length: static shapes);
    # null: only with compile=blocks. Which tokens the MLM / MIM masks pick depends on the padded shape.
    static_text_len: bool | None = None
    # (ours) its backend: "inductor" (fused kernels) or "aot_eager" (the same graphs run by eager kernels:
    # checks graphs, breaks and recompiles in seconds on a CPU, where Inductor takes minutes to compile).
    compile_backend: str = "inductor"
    # (ours) Inductor's mode for the compiled blocks: "default" | "reduce-overhead" (CUDA graphs: each
    # compiled block's kernels replayed as one graph, where shapes are static; CUDA only, no effect on a
    # CPU) | "max-autotune" (CUDA graphs and autotuned kernels) | "max-autotune-no-cudagraphs".
    compile_mode: str = "default"
    dist_timeout_s: int = 600  # a collective that waits this long on a dead rank fails the run
    device: str = "auto"  # auto | cpu | cuda
    # torch's intra-op CPU threads (null: torch's default, one per core). On a shared CPU, 1 avoids the
    # oversubscription that made 2 threads 8x slower for the tiny models (benchmarks/results/evlm-tiny-cpu.md).
    num_threads: int | None = None
    # Bitwise-reproducible runs (ours): deterministic algorithms and one intra-op CPU thread. Without it a
    # multi-threaded CPU run (or a GPU run) can differ from an identical one in the last bits, so a resumed
    # run matches an uninterrupted one to float tolerance only.
    deterministic: bool = False


@dataclass
class Stage0Config:
    """EVLM's stage 0 [ours] (not in the paper, which starts from a pre-trained LLM): with `enabled` and no
    `model.lm_path`, the run first trains its LM alone on the task's text (next-token loss on all of it),
    through the same trainer, in RUN/stage0, and saves it to RUN/lm; the run proper then loads it as its
    frozen LM (`train/stages.py`). The other train/optim keys are the run's."""

    enabled: bool = False
    max_steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01

    def validate(self, model) -> None:
        check(
            not self.enabled or isinstance(model, EVLMConfig),
            "stage0.enabled",
            self.enabled,
            "false for an EVE model (stage 0 trains an EVLM run's language model)",
        )
        for key in ("max_steps", "batch_size"):
            check(getattr(self, key) >= 1, f"stage0.{key}", getattr(self, key), ">= 1")
        check(self.lr > 0, "stage0.lr", self.lr, "> 0")
        check(0 <= self.min_lr <= self.lr, "stage0.min_lr", self.min_lr, f"in [0, stage0.lr={self.lr}]")


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled (online falls back to offline without an API key)
    project: str = "eve-ds"
    name: str | None = None
    entity: str | None = None


@dataclass
class RunConfig:
    model: EVEConfig | EVLMConfig = field(default_factory=EVEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)
    model_flavor: str = "eve_base"
    name: str = "eve"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"flavor": d.pop("model_flavor"), **d["model"]}
        return d

    def validate(self) -> None:
        t, o = self.train, self.optim
        check(
            (t.max_steps is None and self.task.name not in CORPUS_TASKS) or (t.max_steps or 0) >= 1,
            "train.max_steps",
            t.max_steps,
            ">= 1 (null derives it from task.epochs, for a downstream task)",
        )
        check(
            o.warmup_ratio is None or 0 <= o.warmup_ratio < 1,
            "optim.warmup_ratio",
            o.warmup_ratio,
            "in [0, 1)",
        )
        check_phase(o)
        check(t.stop_after is None or t.stop_after >= 1, "train.stop_after", t.stop_after, ">= 1 or null")
        check(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, ">= 1")
        check(t.global_batch_size >= 1, "train.global_batch_size", t.global_batch_size, ">= 1")
        for key in ("checkpoint_every", "eval_every", "log_every", "keep_last", "max_nonfinite_steps"):
            check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), ">= 1")
        choices = {"device": ("auto", "cpu", "cuda"), "nonfinite_check": ("device", "host")}
        choices["zero_grad_norm"] = ("deepspeed", "foreach")
        for key, allowed in choices.items():
            check(getattr(t, key) in allowed, f"train.{key}", getattr(t, key), "one of " + ", ".join(allowed))
        check_compile(self)
        check(t.num_threads is None or t.num_threads >= 1, "train.num_threads", t.num_threads, ">= 1 or null")
        check(o.lr > 0, "optim.lr", o.lr, "> 0")
        check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"in [0, optim.lr={o.lr}]")
        check(
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "optim.betas",
            o.betas,
            "two values in [0, 1)",
        )
        check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
        check(
            o.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            o.schedule,
            "one of cosine, linear, constant",
        )
        check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        check(
            self.wandb.mode in ("online", "offline", "disabled"),
            "wandb.mode",
            self.wandb.mode,
            "one of online, offline, disabled",
        )
        self.model.validate()
        self.objective.validate()
        self.data.validate()
        self.task.validate()
        self.stage0.validate(self.model)
        d = self.data
        check(
            self.task.name not in CORPUS_TASKS or d.synthetic or len(d.train) > 0,
            "data.train",
            [],
            "at least one corpus when data.synthetic is false (pre-training, evlm_packed)",
        )


def check_phase(o: OptimConfig) -> None:
    check(
        o.phase_start is None or 0 < o.phase_start < 1,
        "optim.phase_start",
        o.phase_start,
        "a fraction of train.max_steps in (0, 1), or null",
    )
    check(
        (o.phase_start is None) == (not o.phase_params),
        "optim.phase_params",
        o.phase_params,
        "parameter-name globs (e.g. [encoder.vision.*]) exactly when optim.phase_start is set",
    )


def phase_step(cfg: RunConfig) -> int | None:
    """The first step at which the `optim.phase_params` train: round(phase_start x train.max_steps)."""
    o = cfg.optim
    return None if o.phase_start is None else round(o.phase_start * cfg.train.max_steps)


# -- loading --------------------------------------------------------------------------------------------


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"unknown config {name_or_path!r}: not a file and not one of {packaged_configs()}")
    return packaged


def load_config(name_or_path: str = "eve_tiny_synthetic", overrides: list[str] | None = None) -> RunConfig:
    """Packaged config name or YAML path, then `key=value` dotted overrides -> validated RunConfig."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict) -> RunConfig:
    raw = dict(raw)
    model = dict(raw.pop("model", None) or {})
    flavor = model.pop("flavor", raw.pop("model_flavor", "eve_base"))
    if flavor not in MODEL_FLAVORS:
        raise ConfigError(f"model.flavor={flavor!r} is invalid: expected one of {sorted(MODEL_FLAVORS)}")
    model_cls, factory = MODEL_FLAVORS[flavor]
    for key in ("lm_path", "vision_path"):  # EVLM's frozen sources: `${VAR}` and ~, as the data paths
        if isinstance(model.get(key), str):
            model[key] = _expand(model[key])
    _reject_unknown(model, model_cls, "model", extra=("flavor",))
    hints = typing.get_type_hints(model_cls)
    model = {k: _coerce(hints[k], v, f"model.{k}") for k, v in model.items()}
    try:
        model_cfg = factory(flavor, **model)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    sections = {
        "objective": ObjectiveConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "wandb": WandbConfig,
        "task": TaskConfig,
        "stage0": Stage0Config,
    }
    _reject_unknown(raw, RunConfig, "", extra=())
    if isinstance(raw.get("objective"), dict):  # a config.yaml written before objective.heads existed
        raw["objective"] = upgrade_saved_objective(raw["objective"])
    kwargs: dict[str, Any] = {"model": model_cfg, "model_flavor": flavor, "name": raw.get("name", "eve")}
    for key, cls in sections.items():
        kwargs[key] = _build(cls, raw.get(key) or {}, key)
    _expand_data_paths(kwargs["data"])
    kwargs["train"].init_from = _init_path(kwargs["train"].init_from)
    if kwargs["task"].data_root:
        kwargs["task"].data_root = os.path.expanduser(os.path.expandvars(kwargs["task"].data_root))
    cfg = RunConfig(**kwargs)
    try:
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return cfg


def _expand_data_paths(data: DataConfig) -> None:
    """Environment variables (e.g. ${EVE_DATA_ROOT}) and ~ in shard specs and the cache directory. A path
    with an unset variable is kept as written: `preflight.unset_variables` reports it at start-up and in
    --dry-run, next to every other problem."""

    expand = _expand
    for c in data.train:
        c.shards = expand(c.shards)
    if data.val:
        data.val = expand(data.val)
    data.cache_dir = expand(data.cache_dir)


def _expand(value: str) -> str:
    """`${VAR}` and `~` expanded; a path with an unset variable is kept as written (reported later)."""
    out = os.path.expanduser(os.path.expandvars(value))
    return value if "$" in out else out


def _init_path(value: str | None) -> str | None:
    """`none` -> None (from scratch); `${VAR}` and `~` expanded. An unset variable is kept as written:
    `preflight.init_problem` reports it at start-up (and in --dry-run) with what to do."""
    if value is None or value.strip().lower() in ("none", "null", ""):
        return None
    out = os.path.expanduser(os.path.expandvars(value))
    return value if "$" in out else out


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
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}: {e}") from e


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int/float/str/bool/list/dict/Optional/dataclass)."""
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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid: expected a mapping")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
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


# -- derived values ---------------------------------------------------------------------------------------


def task_context(cfg: RunConfig, tokenizer) -> TaskContext:
    """What the run's task needs besides its own section (the loaded config suffices: nothing derived)."""
    return TaskContext(
        tokenizer=tokenizer,
        cache_dir=cfg.data.cache_dir,
        image_size=cfg.model.image_size,
        # EVLM's LM has rotary positions, hence no text-length limit of its own (0: the task decides).
        max_text_len=getattr(cfg.model, "max_text_len", 0),
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        hflip=cfg.data.hflip,
        data=cfg.data,
        global_batch_size=cfg.train.global_batch_size,
        eval_batches=cfg.train.eval_batches,
        image_mean=cfg.data.image_mean,
        image_std=cfg.data.image_std,
        model=cfg.model,
    )


def resolve(cfg: RunConfig, world_size: int, task: Task) -> RunConfig:
    """The config that runs: `cfg` with every derived value filled in (a new object; `cfg` is unchanged).

    `task` must be prepared (its data read): a step count derived from task.epochs needs its size, and
    its head options (e.g. the number of VQA answers) come from its data.
    """
    check_objectives(cfg, task)
    t = cfg.train
    micro = fit_micro_batch(cfg, world_size)
    max_steps = t.max_steps if t.max_steps is not None else steps_from_epochs(cfg, task)
    train = dataclasses.replace(
        t,
        micro_batch_size=micro,
        grad_accum_steps=t.global_batch_size // (micro * world_size),
        max_steps=max_steps,
    )
    optim = cfg.optim
    if optim.warmup_ratio is not None:
        optim = dataclasses.replace(optim, warmup_steps=round(optim.warmup_ratio * max_steps))
        logger.info("warm-up: %d steps (optim.warmup_ratio=%g)", optim.warmup_steps, optim.warmup_ratio)
    objective = dataclasses.replace(cfg.objective, heads=task.objective_options())
    return dataclasses.replace(cfg, train=train, optim=optim, objective=objective)


def check_objectives(cfg: RunConfig, task: Task) -> None:
    """A downstream task trains its own objectives; pre-training (no fixed set) trains the config's."""
    if task.objectives and cfg.objective.objectives != list(task.objectives):
        want = "[" + ", ".join(task.objectives) + "]"
        raise ConfigError(
            f"objective.objectives={cfg.objective.objectives} but task.name={cfg.task.name} trains "
            f"{want}: set objective.objectives={want}"
        )


def steps_from_epochs(cfg: RunConfig, task: Task) -> int:
    """train.max_steps when it is null: task.epochs passes over the task's training examples."""
    n, gb = task.num_examples(), cfg.train.global_batch_size
    steps = max(1, math.ceil(cfg.task.epochs * n / gb))
    logger.info(
        "task %s: %d training examples, %d steps (%.2f epochs of global batch %d)",
        cfg.task.name,
        n,
        steps,
        steps * gb / n,
        gb,
    )
    return steps


def fit_micro_batch(cfg: RunConfig, world_size: int) -> int:
    """Micro-batch that fits the layout: the largest divisor of global batch / world size that is at most
    `train.micro_batch_size` (the global batch, which the recipe fixes, never changes)."""
    t = cfg.train
    if t.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} does not split over {world_size} ranks"
        )
    per_rank = t.global_batch_size // world_size
    micro = max(d for d in range(1, min(t.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    if micro != t.micro_batch_size:
        logger.warning(
            "train.micro_batch_size %d -> %d: %d ranks x %d x %d accumulation = global batch %d",
            t.micro_batch_size,
            micro,
            world_size,
            micro,
            per_rank // micro,
            t.global_batch_size,
        )
    return micro


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
