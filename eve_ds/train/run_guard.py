"""What a run directory may be used for: a run never writes into another run's directory, and a resumed run
never silently changes what it is.

- `check_run_dir`, before anything is written: the directory is new, empty, or holds a run of the same
  task and model; anything else is refused with what it holds.
- `config_changes`, on resume: the requested (resolved) config against the run's `config.yaml`. Keys in
  `FREE` may differ (they change no result), keys in `CHANGEABLE` only when asked for (`--allow-changes`),
  every other key never: a model, corpus or batch that changes mid-run is another run.
- `record_changes`: an applied change is written, dated, to `config_changes.json` next to `config.yaml`,
  which then describes the run from that step on.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import yaml

from eve_ds.utils.config import ConfigError
from eve_ds.utils.io import atomic_write_json

CHANGES_FILE = "config_changes.json"
# What the trainer, its launcher and wandb leave in a run directory.
RUN_ENTRIES = {
    "config.yaml",
    "ds_config.json",
    "metrics.jsonl",
    "final_metrics.json",
    "checkpoints",
    "train.log",
    "logs",
    "wandb",
    "wandb_id.txt",
    CHANGES_FILE,
    "stage0",  # EVLM's stage 0 (train/stages.py): its own run directory, and the LM it saves
    "lm",
}
# Keys that change no number of the run: bookkeeping, where and how it is laid out (the checkpoint
# loader handles a new world or expert-parallel size: see `convert.resume_options`), when this job stops.
FREE = (
    "model.ep_size",
    "train.micro_batch_size",  # with train.global_batch_size fixed: derived from the world size
    "train.grad_accum_steps",
    "train.device",
    "train.stop_after",
    "train.keep_last",
    "train.dist_timeout_s",
    "train.init_from",  # read only by a run that starts from step 0
    "train.grad_checkpointing",
    "train.deterministic",
    "train.num_threads",
    "data.num_workers",
    "data.cache_dir",
    "wandb.",
    # Read only before the LM of RUN/lm exists; a resumed run loads that LM whatever they say.
    "stage0.",
)
# Keys a resumed run may take, when asked to: the schedule's values and its end, the cadences.
CHANGEABLE = (
    "optim.lr",
    "optim.min_lr",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.warmup_ratio",
    "optim.grad_clip",
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.eval_batches",
    "task.epochs",
    # how the same model is computed: the same numbers to float precision (the padding moves the masks)
    "model.attention_kernel",
    "train.compile",
    "train.compile_backend",
    "train.compile_mode",
    "train.static_text_len",
)


def check_run_dir(run_dir: Path, task: str, flavor: str) -> None:
    """Raise ConfigError unless `run_dir` may hold a `task` run of model `flavor`. Reads only."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory: choose another --run-dir")
    config = run_dir / "config.yaml"
    if not config.is_file():
        other = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and p.name[0] != ".")
        if other:
            shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
            raise ConfigError(
                f"--run-dir {run_dir} is not a run directory (it holds {shown}): choose a new or empty one"
            )
        return
    saved = yaml.safe_load(config.read_text()) or {}
    saved_task = (saved.get("task") or {}).get("name", "msm")
    saved_flavor = (saved.get("model") or {}).get("flavor")
    if (saved_task, saved_flavor) != (task, flavor):
        raise ConfigError(
            f"--run-dir {run_dir} holds a {saved_task} run of {saved_flavor} ({config}); this is a {task} "
            f"run of {flavor}: choose another --run-dir"
        )


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, requested: dict) -> dict[str, tuple]:
    """{dotted key: (saved value, requested value)} for every key whose value differs."""
    a, b = flatten(saved), flatten(requested)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _is(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def is_changeable(key: str) -> bool:
    return _is(key, CHANGEABLE)


def check_resume(saved: dict, requested: dict, allow_changes: bool) -> dict[str, tuple]:
    """The changes a resumed run takes (FREE and, with `allow_changes`, CHANGEABLE keys); raises
    ConfigError naming every other changed key with both values."""
    changes = config_changes(saved, requested)
    fixed = {k: v for k, v in changes.items() if not _is(k, FREE + CHANGEABLE)}
    asked = {k: v for k, v in changes.items() if _is(k, CHANGEABLE)}
    if fixed:
        raise ConfigError(
            "cannot resume with a different "
            + "; ".join(f"{k} (run: {old!r}, requested: {new!r})" for k, (old, new) in fixed.items())
            + ": these fix what the run is; start a new run (another --run-dir) to change them"
        )
    if asked and not allow_changes:
        raise ConfigError(
            "the resumed run has "
            + "; ".join(f"{k}={old!r}, not {new!r}" for k, (old, new) in asked.items())
            + ": pass --allow-changes to apply this from the checkpoint's step on, or drop the override"
        )
    return changes


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple]) -> None:
    """Append one dated entry {time, step, changes: {key: [old, new]}} to RUN_DIR/config_changes.json."""
    path = run_dir / CHANGES_FILE
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append(
        {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step": step,
            "changes": {k: list(v) for k, v in changes.items()},
        }
    )
    atomic_write_json(path, entries)
