"""The pre-training ablations (EVE Tables 5 and 6) at small scale, what runs: `eve_tiny` pre-trained on
the synthetic corpus with each task set for the same wall-clock budget, then fine-tuned on synthetic VQA,
NLVR2 and retrieval over seeds, next to the same fine-tunes from scratch (`runner` runs it, `summary`
aggregates it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PRETRAIN_CONFIG = "eve_tiny_synthetic"

# (label, objectives); [] is the no-pre-training baseline. The last set is the throughput benchmark's
# "+ITC +ITM" row (eve_ds/bench/throughput.py), the one Table 6 compares with MSM.
TASK_SETS: list[tuple[str, list[str]]] = [
    ("MLM + MIM (EVE)", ["mlm", "mim_pixel"]),
    ("MLM", ["mlm"]),
    ("MIM", ["mim_pixel"]),
    ("MLM + MIM, joint masking †", ["msm_joint"]),
    ("MLM + ITC + ITM + MIM", ["mlm", "itc", "itm", "mim_pixel"]),
    ("no pre-training", []),
]

# task -> (packaged config, headline metric, its scale to percent)
FINETUNES: dict[str, tuple[str, str, float]] = {
    "vqa": ("vqa_tiny_synthetic", "vqa_score", 100.0),
    "nlvr2": ("nlvr2_tiny_synthetic", "nlvr2_acc", 100.0),
    "retrieval": ("retrieval_tiny_synthetic", "r_mean", 1.0),
}
# More numbers worth keeping per row (not in the printed table).
EXTRA_METRICS = {"retrieval": ["tr_r1", "ir_r1", "itc_r_mean"], "vqa": [], "nlvr2": []}

# Measured on this project's 2-core CPU with OMP_NUM_THREADS=1 (docs/ablations.md): seconds per
# fine-tuning step, and a process's fixed cost (start-up, data, final evaluation) -- for the printed plan.
FINETUNE_COST_S: dict[str, tuple[float, float]] = {
    "vqa": (0.21, 14.0),
    "nlvr2": (0.39, 13.0),
    "retrieval": (1.1, 28.0),  # its evaluation (ITC over all pairs + ITM re-ranking) is ~20 s of that
}
# Steady steps/s of each task set's pre-training, same machine and threads (the plan's reference).
REFERENCE_RATES: dict[tuple[str, ...], float] = {
    ("mlm", "mim_pixel"): 1.98,
    ("mlm",): 2.75,
    ("mim_pixel",): 4.2,
    ("msm_joint",): 2.3,
    ("mlm", "itc", "itm", "mim_pixel"): 0.85,
}
PRETRAIN_FIXED_S = 20.0  # start-up, final validation and checkpoint of one pre-training run
PROBE_FIXED_S = 12.0


@dataclass
class AblationConfig:
    work_dir: Path = Path("runs/ablations")
    budget_s: float = 180.0  # pre-training loop seconds per task set
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # fine-tuning seeds
    pretrain_seed: int = 0
    # Sized for ~1 h on 2 cores (docs/ablations.md). Measured on this CPU: from ~200 steps of MSM, VQA at 150
    # steps already separates from scratch (0.467 vs 0.440); retrieval at 50 steps and NLVR2 at 150 did not
    # (chance), and NLVR2 stayed near chance for ~1000 steps even from the default 2000-step run.
    finetune_steps: dict[str, int] = field(
        default_factory=lambda: {"vqa": 300, "nlvr2": 800, "retrieval": 120}
    )
    # Fine-tunes run `jobs` at a time, each with one intra-op thread (on 2 cores, two one-thread processes
    # get more done than one two-thread process). Pre-training runs one at a time, with all threads.
    jobs: int = 2
    probe_steps: int = 30
    probe_log_every: int = 5
    task_sets: list[list[str]] = field(default_factory=lambda: [ts for _, ts in TASK_SETS])
    pretrain_overrides: list[str] = field(default_factory=list)  # before the tool's own
    finetune_overrides: list[str] = field(default_factory=list)
    task_overrides: dict[str, list[str]] = field(default_factory=dict)  # task -> its fine-tunes' own
    cache_dir: str | None = None  # data.cache_dir of every run; None: the configs' default
    in_process: bool = False  # run the trainer in this process (--quick: no interpreter start-up per run)


QUICK_SMALL = ["train.global_batch_size=8", "train.micro_batch_size=8", "data.num_workers=0"]
QUICK_PRETRAIN = [
    *QUICK_SMALL,
    "data.synthetic_num_train=256",
    "data.synthetic_num_val=64",
    "train.eval_batches=1",
]
QUICK_FINETUNE = {
    "vqa": ["task.synthetic_num_train=40", "task.synthetic_num_val=20", "task.synthetic_num_test=10",
            "task.minival_images=10"],
    "nlvr2": ["task.synthetic_num_train=64", "task.synthetic_num_val=32", "task.synthetic_num_test=32"],
    "retrieval": ["task.synthetic_num_train=40", "task.synthetic_num_val=20", "task.synthetic_num_test=10"],
}  # fmt: skip


def quick_config(work_dir: Path) -> AblationConfig:
    """A few steps of everything on tiny generated sets, one seed: the pipeline end to end in ~a minute."""
    return AblationConfig(
        work_dir=work_dir,
        budget_s=2.0,
        seeds=[0],
        finetune_steps={"vqa": 2, "nlvr2": 2, "retrieval": 2},
        probe_steps=4,
        probe_log_every=1,
        pretrain_overrides=QUICK_PRETRAIN,
        finetune_overrides=QUICK_SMALL,
        task_overrides=QUICK_FINETUNE,
        cache_dir=str(work_dir / "cache"),
        in_process=True,
    )


def label(task_set: list[str]) -> str:
    return next((name for name, ts in TASK_SETS if ts == list(task_set)), " + ".join(task_set) or "none")


def slug(task_set: list[str]) -> str:
    return "+".join(task_set) or "none"
