"""The throughput benchmark's outputs: a markdown table shaped like the paper's Table 1 and a JSON record
with the device, versions, configuration and git revision; `merge` combines several such records."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from eve_ds.bench.throughput import MSM, BenchConfig, RowResult, with_ratios
from eve_ds.objectives.flops import FORMULA
from eve_ds.utils.markdown import table

NAMES = {"mlm": "MLM", "itc": "ITC", "itm": "ITM", "mim_token": "MIM (token)", "mim_pixel": "MIM (pixel)"}


def task_label(task_set: list[str]) -> str:
    label = " + ".join(NAMES.get(t, t) for t in task_set)
    return f"{label} (MSM, EVE)" if tuple(task_set) == MSM else label


def git_revision() -> tuple[str | None, bool | None]:
    """-> (HEAD commit, whether the tree has uncommitted changes)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions() -> dict:
    import accelerate
    import deepspeed
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
    }


def device_info(device: str) -> dict:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "count_visible": torch.cuda.device_count(),
        }
    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "note": "CPU timings: noisy, only ratios within one run",
    }


def notes(bc: BenchConfig) -> list[str]:
    n = [f"FLOPs: {FORMULA}."]
    if bc.device == "cuda":  # a CPU's pairs/s says nothing about hours on GPUs: no such column then
        n.append(
            f"hours/epoch = corpus_size / (pairs/s per GPU x num_gpus) / 3600 with "
            f"corpus_size={bc.corpus_size:,}, num_gpus={bc.num_gpus}: measured on one device, linear "
            "data-parallel scaling assumed."
        )
    n += [
        "ratio_to_msm = pairs/s of MSM (MLM + MIM-pixel) / pairs/s of the row (= time-per-epoch ratio).",
        "mim_token targets come from a fixed random-codebook tokenizer (cost stand-in only; a trained "
        "tokenizer's forward pass, e.g. VQ-KD's frozen ViT, would add to it); block masks are drawn up front.",
        "ITC/ITM on one device: no features from other ranks (the gather is the identity at world size 1).",
        "Paper rows: composition inferred from the numbers; paper = EVE-Base on 8 x A100.",
    ]
    if bc.data == "pipeline":
        n.append(
            f"data=pipeline: captions have their real lengths; FLOPs still assume {bc.text_len} real tokens."
        )
    if bc.device != "cuda" or bc.batch_size is not None:
        n.append(
            "max_micro_batch is the fixed batch used (no out-of-memory search: "
            + ("CPU" if bc.device != "cuda" else "--batch-size")
            + ")."
        )
    return n


def _row_cells(r: RowResult, gpu: bool) -> list[str]:
    ratio = f"{r.ratio_to_msm:.2f}" if r.ratio_to_msm is not None else "–"
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "–"
    paper = f"{r.paper['max_batch_per_gpu']} / {r.paper['hours_per_epoch']}" if r.paper else "–"
    batch = f"{r.max_micro_batch}" + ("" if r.batch_source == "search" else " (fixed)")
    measured = [f"{r.pairs_per_s:,.1f}", f"{r.hours_per_epoch:,.2f}"] if gpu else [f"{r.pairs_per_s:,.1f}"]
    return [
        task_label(r.task_set),
        batch,
        *measured,
        ratio,
        f"{r.gflops_per_pair:,.1f}",
        *([mfu] if gpu else []),
        paper,
    ]


HEADER = (
    "Pre-training tasks",
    "Max batch / GPU",
    "Pairs/s / GPU",
    "Hours / epoch",
    "× MSM time",
    "GFLOPs / pair",
    "MFU",
    "Paper: batch / hours",
)
# A CPU run: only what it measured (no hours on GPUs extrapolated from it, no MFU, which is per GPU).
CPU_HEADER = ("Pre-training tasks", "Batch", "Pairs/s", "× MSM time", "GFLOPs / pair", "Paper: batch / hours")


def to_markdown(bc: BenchConfig, rows: list[RowResult], meta: dict) -> str:
    dev = meta["device"]["name"]
    gpu = bc.device == "cuda"
    head = (
        f"Pre-training throughput, `{bc.model}` on {dev} ({bc.device}), data={bc.data}, "
        f"ZeRO-{bc.zero_stage}, text {bc.text_len}/{bc.model_config().max_text_len} tokens"
        + (f"; hours per epoch of {bc.corpus_size / 1e6:g}M pairs on {bc.num_gpus} GPUs.\n" if gpu else ".\n")
    )
    lines = [
        head,
        table(HEADER if gpu else CPU_HEADER, (_row_cells(r, gpu) for r in rows)),
        "",
        *[f"- {n}" for n in notes(bc)],
        f"- git {meta['git_revision']}{' (dirty tree)' if meta['git_dirty'] else ''}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- command: `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def to_json(bc: BenchConfig, rows: list[RowResult], meta: dict, paper_ratios: dict | None = None) -> dict:
    """The JSON record; `paper_ratios`: the paper's MSM vs MLM + ITC + ITM + MIM ratios, for `goals`."""
    by = {tuple(r.task_set): r for r in rows}
    full = by.get(("mlm", "itc", "itm", "mim_pixel"))
    msm = by.get(MSM)
    goals = None
    if full and msm:
        goals = {
            "msm_vs_mlm_itc_itm_mim_throughput_ratio": msm.pairs_per_s / full.pairs_per_s,
            "msm_vs_mlm_itc_itm_mim_batch_ratio": msm.max_micro_batch / full.max_micro_batch,
            "msm_pairs_per_s": msm.pairs_per_s,
            "paper": paper_ratios,
        }
    return {
        "benchmark": "pretrain_table1",
        **meta,
        "config": {"bench": dataclasses.asdict(bc), "model": bc.model_config().to_dict()},
        "flops_formula": FORMULA,
        "mfu_formula": "achieved FLOP/s (pairs/s x FLOPs/pair) / peak dense bf16 FLOP/s of one GPU "
        "(H100 SXM / H200 989, A100 312 TFLOP/s); null on CPU",
        "notes": notes(bc),
        "rows": [dataclasses.asdict(r) for r in rows],
        "goals": goals,
    }


def meta_info(bc: BenchConfig, argv: list[str] | None, prog: str = "eve-bench") -> dict:
    """Device, versions, git revision and `command`: `prog` and its arguments, as the footer shows it."""
    cmd = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    commit, dirty = git_revision()
    return {
        "device": device_info(bc.device),
        "versions": versions(),
        "git_revision": commit,
        "git_dirty": dirty,
        "command": cmd.strip(),
    }


def merge(paths: list[Path]) -> tuple[BenchConfig, list[RowResult], dict]:
    """Rows of several JSON records (same model and device) -> (config of the first, rows with their ratios
    recomputed against the MSM row, its meta). Raises ValueError when the records do not match."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    first = records[0]
    for p, r in zip(paths, records):
        if (
            r["config"]["bench"]["model"] != first["config"]["bench"]["model"]
            or r["device"] != first["device"]
        ):
            raise ValueError(f"{p} was measured on another model or device than {paths[0]}")
    bc = BenchConfig(**first["config"]["bench"])
    rows = [RowResult(**row) for r in records for row in r["rows"]]
    bc.task_sets = [r.task_set for r in rows]
    meta = {k: first[k] for k in ("device", "versions", "git_revision", "git_dirty")}
    meta["command"] = " + ".join(r["command"] for r in records)
    return bc, with_ratios(rows), meta
