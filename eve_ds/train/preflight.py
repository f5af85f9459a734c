"""`eve-pretrain --dry-run`: everything a run needs, checked in seconds, before any engine or image.

Resolves the config, opens every corpus manifest, checks that every local shard exists, computes the
corpus mixture the stream will draw, checks the init checkpoint's shapes against the model (built on the
meta device: no memory, no initialisation) and the batch layout for the world size. The trainer itself
runs `init_problem` first thing, so a run of a config that needs an init path stops before it costs
anything.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from eve_ds.data.manifest import MANIFEST, read_manifest, shard_counts
from eve_ds.data.pipeline import corpus_shards, mixture
from eve_ds.data.stream import Corpus
from eve_ds.models.evlm.config import EVLMConfig
from eve_ds.tasks.config import CORPUS_TASKS
from eve_ds.train.config import RunConfig
from eve_ds.train.evlm_tower import eve_tower_problem

# The BEiT v2 checkpoint each flavor starts from ([paper]: EVE is initialised from BEiT v2), by timm name.
BEITV2 = {
    "eve_base": "beitv2_base_patch16_224.in1k_ft_in22k_in1k",
    "eve_large": "beitv2_large_patch16_224.in1k_ft_in22k_in1k",
}


# EVLM reads packed rows, not EVE's image-caption pairs.
EVLM_NEEDS_PACKED = (
    "task.name=msm with an EVLM flavor: EVLM trains on packed shards (eve-make-shards --format "
    "interleaved | caption | vqa | grounding | sft | video); set task.name=evlm_packed"
)


def init_problem(cfg: RunConfig) -> str | None:
    """Why `train.init_from` cannot be used, or None (unset and not required, or an existing path)."""
    path = cfg.train.init_from
    if path is None:
        return None
    if "$" in path and isinstance(cfg.model, EVLMConfig):
        return (
            f"train.init_from={path!r}: the variable is not set; set it to the run directory of the stage "
            "this one starts from (or pass train.init_from=PATH)"
        )
    if "$" in path:  # an environment variable the config names was not set
        timm = BEITV2.get(cfg.model_flavor, BEITV2["eve_base"])
        return (
            f"train.init_from={path!r}: the variable is not set. The paper initialises EVE from BEiT v2: "
            f"convert timm's {timm} checkpoint with `eve-convert import-beitv2 --model "
            f"{cfg.model_flavor} BEITV2_FILE INIT_DIR` (= tools/convert_ckpt.py import-beitv2) and set the "
            f"variable to INIT_DIR, or pass train.init_from=PATH; train.init_from=none trains from scratch"
        )
    if not Path(path).exists():
        return f"train.init_from={path!r}: no such file or directory"
    return None


def unset_variables(cfg: RunConfig) -> list[str]:
    """Data paths that still hold a `${VAR}` after expansion: the variable is not set."""
    d = cfg.data
    paths = [(f"data.train[{c.name}].shards", c.shards) for c in d.train]
    paths += [("data.val", d.val), ("data.cache_dir", d.cache_dir), ("task.data_root", cfg.task.data_root)]
    if isinstance(cfg.model, EVLMConfig):  # the frozen LM and tower
        paths += [("model.lm_path", cfg.model.lm_path), ("model.vision_path", cfg.model.vision_path)]
    return [
        f"{key}={value!r} uses an environment variable that is not set"
        for key, value in paths
        if value and "$" in value
    ]


def start_problems(cfg: RunConfig) -> list[str]:
    """What stops a run before it starts anything (the trainer checks these first): among them the corpora
    the training loader would refuse, so that such a run writes nothing into its directory."""
    problem = init_problem(cfg)
    data = check_corpora(cfg, strict=False)[1] if cfg.task.name in CORPUS_TASKS else []
    tower = eve_tower_problem(cfg.model) if isinstance(cfg.model, EVLMConfig) else None
    return unset_variables(cfg) + data + [p for p in (problem, tower) if p]


def world_size_from_env() -> int:
    """The world size a launcher will use: torchrun's WORLD_SIZE, else Slurm's task count, else 1."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def preflight(cfg: RunConfig, world_size: int) -> dict:
    """-> {"mixture": [{name, pairs, shards, fraction}], "steps_per_epoch", "init_from", "world_size",
    "problems": [...]}; an empty problem list means the run would start."""
    problems = unset_variables(cfg) + layout_problems(cfg, world_size)
    corpora, data_problems = check_corpora(cfg) if cfg.task.name in CORPUS_TASKS else ([], [])
    problems += data_problems + task_problems(cfg)
    rows, steps = mixture(corpora, cfg.train.global_batch_size) if corpora else ([], 0)
    problem = init_problem(cfg)
    evlm = isinstance(cfg.model, EVLMConfig)
    if problem is None and cfg.train.init_from is not None and not evlm:
        problems += init_shape_problems(cfg)
    elif problem:
        problems.append(problem)
    report = {
        "mixture": [{k: r[k] for k in ("name", "pairs", "shards", "fraction")} for r in rows],
        "steps_per_epoch": steps,
        "init_from": cfg.train.init_from,
        "world_size": world_size,
        "problems": problems,
    }
    if evlm:
        from eve_ds.train.evlm_preflight import evlm_plan, evlm_problems

        problems += evlm_problems(cfg)
        report["plan"] = evlm_plan(cfg, world_size)
    return report


def layout_problems(cfg: RunConfig, world: int) -> list[str]:
    t, ep = cfg.train, cfg.model.ep_size
    problems = []
    if world % ep:
        problems.append(f"model.ep_size={ep} does not divide the world size {world}")
    if t.global_batch_size % world:
        problems.append(f"train.global_batch_size={t.global_batch_size} does not split over {world} ranks")
    return problems


def check_corpora(cfg: RunConfig, strict: bool = True) -> tuple[list[Corpus], list[str]]:
    """The training corpora as the stream will see them (counts from manifests, no image read) and every
    problem: unreadable manifests, shards left out of a brace range, local shard files that do not exist,
    a corpus whose shards hold no sample (the loader would refuse it at start-up).

    `strict=False`: only what the loader refuses (no shard file at all, an empty corpus by its manifest),
    without sizing manifest-less corpora (the loader counts those itself) or looking at data.val."""
    d = cfg.data
    if d.synthetic:  # generated at start-up: its size is known from the config
        counts = [d.synthetic_num_train]
        return [Corpus("synthetic", [f"{d.cache_dir}/synthetic (generated)"], counts)], []
    corpora, problems = [], []
    for c in d.train:
        if "$" in c.shards:
            continue  # reported by unset_variables
        try:
            urls, manifest = corpus_shards(c.shards, c.manifest, c.subset)
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"data.train[{c.name}].shards: {e}")
            continue
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if urls and len(missing) == len(urls):
            problems.append(
                f"data.train[{c.name}]: no shard exists ({c.shards}); check its shards: path, or make the "
                "shards with eve-make-shards"
            )
        elif missing and strict:  # the loader skips a missing shard of several, with a warning
            problems.append(
                f"data.train[{c.name}]: {len(missing)} of {len(urls)} shard files missing, e.g. {missing[:3]}"
            )
        present = [u for u in urls if u not in missing]
        if not present:
            continue  # reported above
        if manifest is None and not strict:
            continue
        if manifest is not None:
            by_name = {s["name"]: s["num_samples"] for s in read_manifest(manifest)["shards"]}
            counts = [by_name.get(os.path.basename(u), 0) for u in present]
        else:  # img2dataset shards: their stats files (or the tar headers), as the loader counts them
            try:
                counts = shard_counts(present) if present else []
            except (OSError, ValueError) as e:
                problems.append(f"data.train[{c.name}]: cannot size the corpus without {MANIFEST}: {e}")
                continue
        if sum(counts) == 0:
            problems.append(
                f"data.train[{c.name}]: the corpus is empty: its {len(present)} shard(s) hold 0 samples "
                f"({manifest or c.shards}); see skipped.jsonl next to the manifest for why, then remake them"
            )
        corpora.append(Corpus(c.name, present, counts, c.weight))
    if strict and d.val and "$" not in d.val and "{" not in d.val and not os.path.exists(d.val):
        problems.append(f"data.val={d.val!r}: no such file")
    return corpora, problems


def task_problems(cfg: RunConfig) -> list[str]:
    """A downstream task's dataset directory must exist (a synthetic set is generated at start)."""
    t = cfg.task
    if t.name == "msm" and isinstance(cfg.model, EVLMConfig):
        return [EVLM_NEEDS_PACKED]
    if t.name in CORPUS_TASKS or t.synthetic or not t.data_root or "$" in t.data_root:
        return []
    return [] if os.path.isdir(t.data_root) else [f"task.data_root={t.data_root!r}: no such directory"]


def init_shape_problems(cfg: RunConfig) -> list[str]:
    """Load the init checkpoint on the CPU and compare every tensor's shape with the model's."""
    from eve_ds.convert import ConvertError
    from eve_ds.convert.beit import init_weight_problems, option_problems, source_weights
    from eve_ds.convert.resolution import adapt_resolution
    from eve_ds.objectives import PretrainingModel

    model_cfg = dataclasses.replace(cfg.model, ep_size=1)  # checkpoint names are global expert ids
    with torch.device("meta"):
        own = {k: v.shape for k, v in PretrainingModel(model_cfg, cfg.objective).state_dict().items()}
    try:
        sd, report = source_weights(cfg.train.init_from, model_cfg)
    except (ConvertError, OSError) as e:
        return [f"train.init_from: {e}"]
    adapt_resolution(sd, own)
    problems, _ = init_weight_problems(sd, own, report["source"])
    problems += option_problems(model_cfg, report.get("model") or {})
    return [f"train.init_from={cfg.train.init_from!r}: {p}" for p in problems]


def format_report(report: dict) -> str:
    lines = [f"{'corpus':12s} {'pairs':>12s} {'shards':>7s} {'fraction':>9s}"]
    lines += [
        f"{m['name']:12s} {m['pairs']:12,d} {m['shards']:7d} {m['fraction']:9.3f}" for m in report["mixture"]
    ]
    lines.append(f"steps per epoch: {report['steps_per_epoch']:,}   world size: {report['world_size']}")
    lines.append(f"init_from: {report['init_from']}")
    if "plan" in report:
        from eve_ds.train.evlm_preflight import format_plan

        lines += format_plan(report["plan"])
    lines += [f"PROBLEM: {p}" for p in report["problems"]] or ["no problems: the run would start"]
    return "\n".join(lines)
