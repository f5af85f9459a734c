"""Every number this project compares with the paper, and where in the paper it is.

Paper: EVE: Efficient Vision-Language Pre-training with Masked Prediction and Modality-Aware MoE (Chen et
al., AAAI 2024, arXiv:2308.11971). Percent unless stated. A cell the paper's table does not give here is
None: it is shown as "—" and never compared.
"""

from __future__ import annotations

CITATION = "EVE (Chen et al., AAAI 2024, arXiv:2308.11971)"

# -- Table 1: pre-training cost per task set (EVE-Base, 8 x A100) ---------------------------------------

# Task set -> (max batch per GPU, hours per epoch). The rows' task sets are read from the costs (relative
# to one full fusion pass) and the text (MSM fastest, "+ITC+ITM" about 3.5x slower).
TABLE1: dict[tuple[str, ...], tuple[int, float]] = {
    ("mlm", "mim_pixel"): (224, 2.14),
    ("mlm", "mim_token"): (152, 3.09),
    ("mlm", "itc", "mim_pixel"): (132, 3.26),
    ("mlm", "itc", "itm"): (80, 6.88),
    ("mlm", "itc", "itm", "mim_pixel"): (64, 7.73),
}
TABLE1_GPUS = "8 x A100"
# Table 1 / text: MSM vs MLM + ITC + ITM + MIM, throughput and max-batch ratios.
TABLE1_RATIOS = {"throughput_ratio": 3.6, "batch_ratio": 3.5}


def table1_row(task_set: list[str] | tuple[str, ...]) -> dict | None:
    """The Table 1 row of a task set as the benchmark records it, or None when the paper has none."""
    p = TABLE1.get(tuple(task_set))
    return {"max_batch_per_gpu": p[0], "hours_per_epoch": p[1], "gpus": TABLE1_GPUS} if p else None


# -- Table 9: VQA inference time on the VQA v2 test set and parameters per token -----------------------

TABLE9_HARDWARE = "8 x V100"
# model -> (minutes for the VQA test set, parameters per token as the paper counts them)
TABLE9: dict[str, tuple[float, int]] = {
    "ALBEF": (35.3, 210_000_000),
    "VLMo": (21.6, 180_000_000),
    "EVE-Base": (24.8, 190_000_000),
}


def table9_rows() -> list[dict]:
    """Table 9's rows as the inference benchmark prints them."""
    return [
        {"model": m, "minutes": t, "params_per_token": p, "hardware": TABLE9_HARDWARE}
        for m, (t, p) in TABLE9.items()
    ]


# -- Table 2 (VQA v2 test-dev, NLVR2 dev / test-P) and Table 4 (fine-tuned retrieval) ---------------------

FINETUNED_SOURCE = "EVE (AAAI 2024) Table 2 (VQA, NLVR2) and Table 4 (retrieval)"
# (size, corpus) -> {(task, metric, split): percent}. Table 2 / Table 4, row EVE-Base (4M); retrieval on
# COCO 5K and Flickr30K 1K test, R@1 only. The EVE-Large rows are not given here.
FINETUNED: dict[tuple[str, str], dict[tuple[str, str, str], float]] = {
    ("base", "4m"): {
        ("vqa", "vqa_score", "test-dev"): 78.00,
        ("nlvr2", "nlvr2_acc", "dev"): 83.34,
        ("nlvr2", "nlvr2_acc", "test-P"): 83.93,
        ("retrieval_coco", "tr_r1", "test"): 79.6,
        ("retrieval_coco", "ir_r1", "test"): 62.0,
        ("retrieval_flickr30k", "tr_r1", "test"): 95.6,
        ("retrieval_flickr30k", "ir_r1", "test"): 84.1,
    },
    ("large", "4m"): {},
    ("large", "16m"): {},
}

# -- Tables 5 and 6: pre-training ablations (EVE-Base, 4M corpus) ----------------------------------------

ABLATIONS_SOURCE = (
    f"{CITATION} Tables 5 and 6. Given here: MIM's NLVR2 (57, split not stated); the other cells are "
    "not given (null)."
)
# The task sets of each table, as this project's objective names.
TABLE5: tuple[tuple[str, ...], ...] = (("mlm", "mim_pixel"), ("mlm",), ("mim_pixel",), ("msm_joint",))
TABLE6: tuple[tuple[str, ...], ...] = (("mlm", "mim_pixel"), ("mlm", "itc", "itm", "mim_pixel"))
# Task set -> {headline metric: percent or None}.
ABLATIONS: dict[tuple[str, ...], dict[str, float | None]] = {
    ("mlm", "mim_pixel"): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
    ("mlm",): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
    ("mim_pixel",): {"vqa_score": None, "nlvr2_acc": 57.0, "r_mean": None},
    ("msm_joint",): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
    ("mlm", "itc", "itm", "mim_pixel"): {"vqa_score": None, "nlvr2_acc": None, "r_mean": None},
}
# The orderings Tables 5 and 6 report: each a chain of task sets, best first.
ABLATION_CLAIMS: list[tuple[str, list[tuple[str, ...]]]] = [
    ("Table 5: MLM + MIM > MLM > joint † > MIM", [*TABLE5[:2], TABLE5[3], TABLE5[2]]),
    ("Table 6: MLM + MIM > MLM + ITC + ITM + MIM at equal compute", list(TABLE6)),
]
