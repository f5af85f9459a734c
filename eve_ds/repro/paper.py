"""Every number this project compares with the paper, and where in the paper it is.

Paper: EVE: Efficient Vision-Language Pre-training with Masked Prediction and Modality-Aware MoE (Chen et
al., AAAI 2024, arXiv:2308.11971). Percent unless stated. A cell the paper's table does not give here is
None: it is shown as "—" and never compared.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# -- Tables 2 and 4: fine-tuned EVE on VQA v2, NLVR2, COCO and Flickr30K retrieval -------------------------

Key = tuple[str, str, str]  # (task, metric, split), this project's naming


@dataclass(frozen=True)
class PaperRow:
    """One row of one of the paper's tables: where it is and its cells (percent; None = not given)."""

    table: int
    row: str
    values: dict

    @property
    def where(self) -> str:
        return f"Table {self.table}, row {self.row}"


FINETUNED_SOURCE = f"{CITATION} Table 2 (EVE-Base 4M) and Table 4 (EVE-Large 4M and 16M)"
# Retrieval is COCO 5K and Flickr30K 1K test. The paper gives R@1 only for EVE: the R@5 / R@10 / r_mean
# rows of the report have no paper cell, ever.
FINETUNED: dict[tuple[str, str], PaperRow] = {
    ("base", "4m"): PaperRow(
        2,
        "EVE-Base (Ours) [4M]",
        {
            ("vqa", "vqa_score", "test-dev"): 78.00,
            ("vqa", "vqa_score", "test-std"): 78.02,
            ("nlvr2", "nlvr2_acc", "dev"): 83.34,
            ("nlvr2", "nlvr2_acc", "test-P"): 83.93,
            ("retrieval_coco", "tr_r1", "test"): 79.6,
            ("retrieval_coco", "ir_r1", "test"): 62.0,
            ("retrieval_flickr30k", "tr_r1", "test"): 95.6,
            ("retrieval_flickr30k", "ir_r1", "test"): 84.1,
        },
    ),
    ("large", "4m"): PaperRow(
        4,
        "EVE-Large (Ours) [4M]",
        {
            ("vqa", "vqa_score", "test-dev"): 79.25,
            ("vqa", "vqa_score", "test-std"): 79.20,
            ("nlvr2", "nlvr2_acc", "dev"): 84.03,
            ("nlvr2", "nlvr2_acc", "test-P"): 84.69,
            ("retrieval_coco", "tr_r1", "test"): 82.5,
            ("retrieval_coco", "ir_r1", "test"): 65.2,
            ("retrieval_flickr30k", "tr_r1", "test"): 96.3,
            ("retrieval_flickr30k", "ir_r1", "test"): 86.3,
        },
    ),
    ("large", "16m"): PaperRow(
        4,
        "EVE-Large (Ours) [16M]",
        {
            ("vqa", "vqa_score", "test-dev"): 80.17,
            ("vqa", "vqa_score", "test-std"): 80.18,
            ("nlvr2", "nlvr2_acc", "dev"): 85.63,
            ("nlvr2", "nlvr2_acc", "test-P"): 86.22,
            ("retrieval_coco", "tr_r1", "test"): 83.5,
            ("retrieval_coco", "ir_r1", "test"): 66.7,
            ("retrieval_flickr30k", "tr_r1", "test"): 98.0,
            ("retrieval_flickr30k", "ir_r1", "test"): 87.9,
        },
    ),
}

# -- Tables 5 and 6: pre-training ablations (EVE-Base-like, 25 pre-training epochs on the 4M corpus) --------

ABLATIONS_SOURCE = (
    f'{CITATION} Tables 5 and 6 (NLVR2 dev / test-P, Flickr30K TR@1 / IR@1, VQA "dev" as the paper names '
    "it). The paper gives no r_mean; Table 6's NLVR2 cells are in appendix Table 10, with another "
    "initialisation, and are not shown."
)
# The paper's ablation columns, in its order.
ABLATION_COLUMNS: tuple[Key, ...] = (
    ("nlvr2", "nlvr2_acc", "dev"),
    ("nlvr2", "nlvr2_acc", "test-P"),
    ("retrieval_flickr30k", "tr_r1", "test"),
    ("retrieval_flickr30k", "ir_r1", "test"),
    ("vqa", "vqa_score", "dev"),
)
# The task sets of each table, as this project's objective names.
TABLE5: tuple[tuple[str, ...], ...] = (("mlm", "mim_pixel"), ("mlm",), ("mim_pixel",), ("msm_joint",))
TABLE6: tuple[tuple[str, ...], ...] = (("mlm", "mim_pixel"), ("mlm", "itc", "itm", "mim_pixel"))


def _ablation(table: int, row: str, *cells: float | None) -> PaperRow:
    return PaperRow(table, row, dict(zip(ABLATION_COLUMNS, cells, strict=True)))


# table -> task set -> its row. Table 5's row labels for MIM only / MLM only come from the paper's prose;
# Table 6's task check marks are lost in the text, so which of its rows 1-3 is "+ ITC + ITM" is not known
# and that task set's cells stay None.
ABLATIONS: dict[int, dict[tuple[str, ...], PaperRow]] = {
    5: {
        ("mlm", "mim_pixel"): _ablation(5, "MIM + MLM (ours)", 79.7, 80.1, 93.9, 80.7, 77.3),
        ("mlm",): _ablation(5, "MLM only", 78.8, 79.3, 92.2, 79.2, 77.0),
        ("mim_pixel",): _ablation(5, "MIM only", 57.2, 57.4, 30.4, 22.9, 60.9),
        ("msm_joint",): _ablation(5, "MIM + MLM, jointly masked (†)", 75.4, 75.7, 88.6, 74.2, 74.6),
    },
    6: {
        ("mlm", "mim_pixel"): _ablation(6, "MIM + MLM (best row)", None, None, 94.4, 81.2, 77.4),
        ("mlm", "itc", "itm", "mim_pixel"): _ablation(
            6, "+ ITC + ITM (row not identifiable)", None, None, None, None, None
        ),
    },
}
# The orderings Tables 5 and 6 report: each a chain of task sets, best first.
ABLATION_CLAIMS: list[tuple[str, list[tuple[str, ...]]]] = [
    ("Table 5: MLM + MIM > MLM > joint † > MIM", [*TABLE5[:2], TABLE5[3], TABLE5[2]]),
    ("Table 6: MLM + MIM > MLM + ITC + ITM + MIM at equal compute", list(TABLE6)),
]
