"""VQA inference speed and parameters per token (the paper's Table 9) on this machine.

What is timed is the model alone, as in the paper ("excluding preprocessing"): batches of questions are
tokenised, padded and moved to the device before the clock starts, images are uint8 pixels already on the
device, normalised there inside the timed call (as evaluation does after the transfer), and each timed call
is the VQA model's forward (encoder over [image; question] + answer head) under `torch.no_grad`, in bf16 on
CUDA and float32 on the CPU, with a synchronisation after the last batch of a window.

Images are random pixels: the cost of a forward pass does not depend on them (no-drop MoE routing changes
which experts get which tokens, not how many tokens are computed). Questions come from a VQA v2 questions
file (real lengths) or are a fixed question of `text_len` tokens.

`minutes_test_dev` = 107,394 questions (VQA v2 test-dev) / questions per second / 60 on one device;
`minutes_on_gpus` divides that by `num_gpus` (the paper used 8 V100s; linear data-parallel scaling assumed).
Parameters per token: `eve_ds.objectives.info.count_parameters` (`params_active_per_token`: MoE blocks count
`top_k` experts; embeddings and the answer head reported apart).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eve_ds.data import load_tokenizer
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.objectives.info import count_parameters
from eve_ds.utils.image import normalize_image

VQA_TEST_DEV_QUESTIONS = 107_394
VQA_NUM_ANSWERS = 3129


@dataclass
class InferenceBenchConfig:
    models: list[str] = field(default_factory=lambda: ["eve_tiny"])
    device: str = "cpu"
    batch_size: int = 32
    num_batches: int = 4  # timed batches per window
    windows: int = 3  # the fastest window is reported (least disturbed by other processes)
    warmup_batches: int = 1
    questions: str | None = None  # VQA v2 questions JSON; None = a fixed question of text_len tokens
    text_len: int = 10  # [CLS] + 8 word pieces + [SEP]: about a VQA v2 question
    num_gpus: int = 8
    num_answers: int = VQA_NUM_ANSWERS
    tokenizer: str = "bert-base-uncased"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


def question_texts(bc: InferenceBenchConfig, n: int) -> list[str]:
    """`n` questions: the first of the file (cycled if it has fewer), else a fixed one."""
    if bc.questions is None:
        return [" ".join(["what"] * (bc.text_len - 2))] * n  # one word piece each, + [CLS], [SEP]
    with open(bc.questions) as f:
        qs = [q["question"] for q in json.load(f)["questions"]]
    if not qs:
        raise ValueError(f"{bc.questions}: no questions")
    return [qs[i % len(qs)] for i in range(n)]


def build_vqa_model(name: str, bc: InferenceBenchConfig) -> PretrainingModel:
    cfg = dataclasses.replace(get_config(name), ep_size=1)
    obj = ObjectiveConfig(objectives=["vqa"], heads={"vqa": {"num_answers": bc.num_answers}})
    torch.manual_seed(0)
    return PretrainingModel(cfg, obj).to(bc.device, bc.dtype).eval()


def make_batches(model: PretrainingModel, bc: InferenceBenchConfig, n_batches: int) -> list[dict]:
    """Pre-collated batches on the device: uint8 images (B, 3, S, S), text_ids / text_mask (B, L)."""
    cfg = model.model_cfg
    tok = load_tokenizer(bc.tokenizer)
    texts = question_texts(bc, n_batches * bc.batch_size)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n_batches):
        t = tok(
            texts[i * bc.batch_size : (i + 1) * bc.batch_size],
            max_length=cfg.max_text_len,
            truncation=True,
            padding="max_length",  # as vqa_collate pads
            return_tensors="pt",
        )
        image = torch.randint(0, 256, (bc.batch_size, 3, cfg.image_size, cfg.image_size), generator=gen)
        batches.append(
            {
                "image": image.to(torch.uint8).to(bc.device),
                "text_ids": t["input_ids"].to(bc.device),
                "text_mask": t["attention_mask"].to(bc.device),
            }
        )
    return batches


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_forward(model: PretrainingModel, batches: list[dict], bc: InferenceBenchConfig) -> float:
    """Seconds per batch of the fastest window (after `warmup_batches` untimed ones)."""
    vqa = model.objectives["vqa"]

    def forward(b: dict) -> torch.Tensor:
        inputs = {**b, "image": normalize_image(b["image"], bc.dtype)}
        return vqa(model.encoder, inputs, None)["vqa_logits"]

    for b in batches[: bc.warmup_batches]:
        forward(b)
    timed = batches[bc.warmup_batches :]
    best = float("inf")
    for _ in range(bc.windows):
        sync(bc.device)
        t0 = time.perf_counter()
        for b in timed:
            forward(b)
        sync(bc.device)
        best = min(best, (time.perf_counter() - t0) / len(timed))
    return best


def bench_model(name: str, bc: InferenceBenchConfig) -> dict:
    model = build_vqa_model(name, bc)
    counts = count_parameters(model)
    batches = make_batches(model, bc, bc.warmup_batches + bc.num_batches)
    per_batch = time_forward(model, batches, bc)
    qps = bc.batch_size / per_batch
    minutes = VQA_TEST_DEV_QUESTIONS / qps / 60
    mean_len = float(torch.cat([b["text_mask"] for b in batches]).sum(1).float().mean())
    return {
        "model": name,
        "device": bc.device,
        "dtype": str(bc.dtype).removeprefix("torch."),
        "batch_size": bc.batch_size,
        "questions_timed": bc.num_batches * bc.batch_size * bc.windows,
        "mean_question_tokens": round(mean_len, 2),
        "questions_per_s": round(qps, 2),
        "minutes_test_dev": round(minutes, 2),
        "minutes_on_gpus": round(minutes / bc.num_gpus, 2),
        "num_gpus": bc.num_gpus,
        "params_active_per_token": counts["params_active_per_token"],
        "params_embeddings": counts["params_embeddings"],
        "params_vqa_head": counts["params_heads"],
        "params_encoder": counts["params_encoder"],
    }


def run_inference_bench(
    bc: InferenceBenchConfig, progress: Callable[[dict], None] | None = None
) -> list[dict]:
    rows = []
    for name in bc.models:
        rows.append(bench_model(name, bc))
        if progress:
            progress(rows[-1])
    return rows


def to_markdown(bc: InferenceBenchConfig, rows: list[dict], paper_rows: list[dict], meta: dict) -> str:
    """One table: the measured rows, then the paper's (`paper_rows`: {"model", "minutes", "params_per_token",
    "hardware"})."""
    lines = [
        f"# VQA inference (Table 9) on {meta.get('device_name', bc.device)}",
        "",
        f"Model forward only (pre-collated batches on the device), batch {bc.batch_size}, "
        f"{rows[0]['dtype'] if rows else ''}; minutes for the {VQA_TEST_DEV_QUESTIONS:,} questions of "
        f"VQA v2 test-dev on one device and, assuming linear scaling, on {bc.num_gpus}.",
        "",
        f"| model | questions/s | min (1 device) | min (/{bc.num_gpus}) | active params/token | + embeddings |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['device']}) | {r['questions_per_s']:.1f} | {r['minutes_test_dev']:.1f} | "
            f"{r['minutes_on_gpus']:.1f} | {r['params_active_per_token'] / 1e6:.1f}M | "
            f"{(r['params_active_per_token'] + r['params_embeddings']) / 1e6:.1f}M |"
        )
    for p in paper_rows:
        lines.append(
            f"| paper: {p['model']} ({p['hardware']}) | – | – | {p['minutes']} | "
            f"{p['params_per_token'] / 1e6:.0f}M (as counted by the paper) | – |"
        )
    lines += ["", "Command: `" + meta.get("command", "") + "`", ""]
    return "\n".join(lines)
