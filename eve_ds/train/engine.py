"""The one place that builds the DeepSpeed engine: merged DeepSpeed config, parameter groups, optimizer,
schedule, `deepspeed.initialize`."""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import Tensor, nn

from eve_ds.train.compile import compile_blocks
from eve_ds.train.config import DS_CONFIG_DIR, ConfigError, RunConfig, phase_step
from eve_ds.train.zero_step import make_step_sync_free

logger = logging.getLogger(__name__)

# ds_configs/*.json may hold only these: batch sizes, optimizer and schedule come from the run config.
DS_ALLOWED_KEYS = {
    "bf16",
    "fp16",
    "zero_optimization",
    "communication_data_type",
    "comms_logger",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
    "activation_checkpointing",
    "flops_profiler",
    "timers",
}


def load_ds_file(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"train.ds_config={name_or_path!r}: no file {path} (packaged: {names})")
    ds = json.loads(path.read_text())
    extra = sorted(set(ds) - DS_ALLOWED_KEYS)
    if extra:
        raise ConfigError(
            f"{path}: keys {extra} belong in the run config (batch, optimizer, schedule, "
            f"clipping); a DeepSpeed file holds only {sorted(DS_ALLOWED_KEYS)}"
        )
    return ds


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """ds_configs/<name>.json (ZeRO / precision / communication) + batch, accumulation and clipping, as the
    run config states them (`train.config.resolve` fits the micro-batch to the world size; nothing here
    changes the config). Without `train.grad_accum_steps`, the accumulation is global / (micro x world)."""
    t = cfg.train
    accum = t.grad_accum_steps or t.global_batch_size // (t.micro_batch_size * world_size)
    if t.micro_batch_size * accum * world_size != t.global_batch_size:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} x {world_size} ranks x accumulation {accum} != "
            f"train.global_batch_size={t.global_batch_size}: resolve the config (train.config.resolve) first"
        )
    ds = load_ds_file(cfg.train.ds_config)
    if cfg.train.device == "cpu" and ds.get("bf16", {}).get("enabled"):
        logger.warning("bf16 on CPU is slow and not what the CPU tests use; use train.ds_config=zero2_cpu")
    ds.update(
        train_batch_size=cfg.train.global_batch_size,
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        gradient_accumulation_steps=accum,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10**9,
        zero_allow_untested_optimizer=True,  # the client optimizer below is torch's AdamW
    )
    return ds


# Parameters that are not weight matrices but tokens or tables (BEiT / MAE: `no_weight_decay()` of the model).
NO_DECAY_NAMES = (
    "cls_token",
    "mask_token",
    "pos_embed",
    "text_pos_embed",
    "relative_position_bias_table",
    "modality_bias",
    "media_tokens",  # EVLM's learned image tokens (a table, like the [CLS] and mask tokens)
    "time_embed",  # EVLM's opt-in frame table (model.video_time_embed)
)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """BEiT / MAE: no decay for biases, norm weights and other 1-d parameters (layer scale γ), the [CLS]
    and mask tokens, EVLM's media tokens, position tables, relative-position bias tables and the router's
    modality biases.
    Every weight matrix decays, the patch projection and the word embedding included (as in BEiT, MAE
    and BERT)."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    head_lr_mult: float = 1.0,
    phase_params: list[str] | tuple[str, ...] = (),
) -> list[dict]:
    """decay / no_decay groups (`no_weight_decay`), split again into encoder and heads when the heads get
    their own LR (`task.head_lr_mult`), into early and late parameters (names matching a glob of
    `phase_params`, flagged `late`: `lr_lambdas`), then into dense and expert parameters (DeepSpeed's MoE
    groups, which copy every key of the group they split, `late` included)."""
    groups: dict[tuple[str, bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = head_lr_mult != 1.0 and not name.startswith("encoder.")
            late = any(fnmatch.fnmatchcase(name, g) for g in phase_params)
            kind = "no_decay" if no_weight_decay(name, p) else "decay"
            groups.setdefault((kind, head, late), []).append(p)
    if phase_params and not any(late for _, _, late in groups):
        raise ConfigError(
            f"optim.phase_params={list(phase_params)}: no trainable parameter matches; trainable names "
            f"look like {[n for n, p in model.named_parameters() if p.requires_grad][:3]}"
        )
    out = [
        {
            "name": kind + ("_head" if head else "") + ("_late" if late else ""),
            "params": params,
            "weight_decay": weight_decay if kind == "decay" else 0.0,
            "lr": lr * (head_lr_mult if head else 1.0),
            "late": late,
        }
        for (kind, head, late), params in sorted(groups.items())
    ]
    # Expert parameters get groups of their own: ZeRO-2 reduces them over the expert-data-parallel group.
    return split_params_into_different_moe_groups_for_optimizer(out)


def lr_lambda(cfg: RunConfig):
    """Multiplier of the peak LR at a step: linear warm-up, then cosine (or linear) decay to min_lr."""
    o, total = cfg.optim, cfg.train.max_steps
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return f


def lr_lambdas(cfg: RunConfig, groups: list[dict]) -> list:
    """One LR multiplier per optimizer group, in the optimizer's order (after DeepSpeed's MoE split, which
    adds groups): the shared schedule, times 0 before `phase_step` for the groups flagged `late`.

    One schedule for the whole run, so a checkpoint restores it exactly and nothing is rebuilt at the
    phase start. While its factor is 0 a late group is bitwise unchanged (AdamW's step and decoupled weight
    decay both scale with the LR) but its Adam moments already accumulate, as its backward runs."""
    f, start = lr_lambda(cfg), phase_step(cfg)

    def late(step: int) -> float:
        return f(step) if step >= start else 0.0

    return [late if start is not None and g.get("late") else f for g in groups]


def nonfinite(norm: Tensor | float) -> Tensor:
    """1.0 when a global gradient norm is inf, nan or DeepSpeed's -1 "invalid" sentinel, else 0.0 (0-d, on
    the norm's device: nothing is read to the host)."""
    norm = torch.as_tensor(norm)
    return (~torch.isfinite(norm) | (norm < 0)).float().reshape(())


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """torch's AdamW that leaves parameters, moments and step counts unchanged when this step's global
    gradient norm is not finite, decided on the device.

    With `bf16.check_grad_overflow=false` DeepSpeed's ZeRO optimizer no longer tests every gradient tensor
    (a loop of ~12 ops per tensor ending in a host read) and applies whatever the gradients hold. The fused
    kernels take a `found_inf` tensor and skip the update where it is 1 (torch/optim/adam.py, the
    GradScaler protocol), so the skip needs no host read. `grad_norm` returns the ZeRO optimizer's global
    norm, which it computes before calling this step for each parameter group."""

    grad_norm: Callable[[], Tensor | float | None] | None = None
    _found_inf_of: Tensor | float | None = None  # the norm `found_inf` was computed from

    def step(self, closure=None):
        norm = self.grad_norm() if self.grad_norm is not None else None
        # DeepSpeed steps one group at a time with the same norm object: test it once per step.
        if norm is not None and self.defaults.get("fused") and norm is not self._found_inf_of:
            self.found_inf, self._found_inf_of = nonfinite(norm), norm
        return super().step(closure)


def build_engine(cfg: RunConfig, model: nn.Module, world_size: int, device: str):
    """-> (engine, optimizer, lr_scheduler, merged DeepSpeed config)."""
    ds_config = build_ds_config(cfg, world_size)
    o = cfg.optim
    optimizer = SkipNonFiniteAdamW(
        param_groups(model, o.weight_decay, o.lr, cfg.task.head_lr_mult, o.phase_params),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        # One fused kernel over each tensor, also on the CPU (about 12x faster than the per-op loop there).
        fused=device in ("cuda", "cpu"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(cfg, optimizer.param_groups))
    if o.phase_start is not None:
        late = sum(p.numel() for g in optimizer.param_groups if g["late"] for p in g["params"])
        logger.info("LR phase: %.1fM parameters (%s) train from step %d", late / 1e6, o.phase_params,
                    phase_step(cfg))  # fmt: skip
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if engine.zero_optimization_stage() in (1, 2):
        # ZeRO-1/2 set the norm before each inner step; other wrappers skip non-finite steps themselves.
        engine.optimizer.optimizer.grad_norm = lambda: getattr(engine.optimizer, "_global_grad_norm", None)
        # Its norm and clip without host reads (same numbers); one foreach norm per group if asked.
        make_step_sync_free(engine.optimizer, foreach_norm=cfg.train.zero_grad_norm == "foreach")
    if cfg.train.compile == "blocks":  # on the module in its training dtype (DeepSpeed cast it)
        compile_blocks(engine.module, cfg.train.compile_backend, cfg.train.compile_mode)
    return engine, optimizer, scheduler, ds_config
