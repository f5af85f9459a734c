"""EVLM on a public benchmark (`vqav2`, `gqa`, `textvqa`, `pope`, `mme`, `mmbench`): one evaluation-only
task registered under each name. `eve-evaluate --task NAME --checkpoint RUN --data-root DIR [--split S]`
reads the benchmark's files (`data.py`), answers every question by greedy decoding with the KV cache
(`EVLMModel.generate_greedy`), and scores the answers with the benchmark's official metric (`metrics.py`).

A row is [K media tokens] + the tokenized prompt (the LM's tokenizer, `model.lm_path`), laid out as
`task.bench_prompt` says (plain, the SFT rows' `user: ... assistant:`, or the tokenizer's chat template);
rows are decoded in length-sorted batches, padded at the start. The answer is the decoded text up to the LM's
end-of-sequence token, its first line, stripped. The image is read as the run's training read it
(`task.image_geometry`, `data.image_mean` / `image_std`); one that cannot be read is counted
(`num_bad_images`) and its question left out of the scores.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass

import torch

from eve_ds.models.evlm.masks import layout_row, stack_rows
from eve_ds.tasks.base import DATA_ROOT_HINT, Task, TaskDataError, decode_image, register_task
from eve_ds.tasks.evlm_bench.data import READERS, BenchQuestion
from eve_ds.tasks.evlm_bench.metrics import SCORERS
from eve_ds.utils.image import normalize_image
from eve_ds.utils.io import atomic_write_text
from eve_ds.utils.ranks import gather_objects, rank_and_world

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    title: str
    metric: str  # the main key of its scores
    max_new_tokens: int  # [ours] single words or phrases, yes / no, an option letter


BENCHMARKS = {
    "vqav2": Benchmark("VQAv2", "vqa_score", 16),
    "gqa": Benchmark("GQA", "gqa_acc", 16),
    "textvqa": Benchmark("TextVQA", "textvqa_acc", 16),
    "pope": Benchmark("POPE", "pope_acc", 8),
    "mme": Benchmark("MME", "mme_perception", 8),
    "mmbench": Benchmark("MMBench", "mmbench_acc", 8),
}


def lm_tokenizer(path: str):
    """The tokenizer saved with the LM. From its `tokenizer.json` as `PreTrainedTokenizerFast` when there is
    one: AutoTokenizer picks its class from the LM's model type, which may not be the tokenizer saved."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    from eve_ds.data.pipeline import load_tokenizer

    return load_tokenizer(path)


class EVLMBenchTask(Task):
    """Evaluation only: `cfg.name` picks the benchmark (BENCHMARKS)."""

    objectives = ("caption_lm",)

    @property
    def bench(self) -> Benchmark:
        return BENCHMARKS[self.cfg.name]

    @property
    def metric(self) -> str:
        return self.bench.metric

    def prepare(self) -> None:
        """The LM's tokenizer (model.lm_path, else data.tokenizer) and the media token's id."""
        from eve_ds.models.evlm.model import media_token_id  # transformers: only runs of this task

        m = self.ctx.model
        if m is None or not hasattr(m, "num_media_tokens"):
            raise TaskDataError(
                f"task.name={self.cfg.name}: an EVLM benchmark; the checkpoint is not an EVLM run"
            )
        self.tokenizer = lm_tokenizer(m.lm_path) if m.lm_path else self.ctx.tokenizer
        self.media_id = media_token_id(m)
        fmt = self.cfg.bench_prompt
        self.prompt_format = ("sft" if m.stage == "stage3" else "plain") if fmt == "auto" else fmt
        if self.prompt_format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise TaskDataError(
                f"task.bench_prompt=chat: the tokenizer of {m.lm_path or 'the run'} has no chat template "
                "(tokenizer_config.json `chat_template`); use plain or sft"
            )

    def question_docs(self, prompt: str) -> list[dict]:
        """A question as `layout_row` segments (task.bench_prompt): its image, then the prompt's text."""

        def ids(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

        image = {"image": 0}
        if self.prompt_format == "plain":
            return [image, {"text": ids(prompt)}]
        if self.prompt_format == "sft":  # as data/documents.py lays out a user turn: words joined by spaces
            return [image, {"text": ids("user:") + ids(" " + " ".join(prompt.split())) + ids(" assistant:")}]
        mark = "\x00question\x00"  # chat: the template rendered around a marker, the image opening the turn
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
        )
        before, _, after = rendered.partition(mark)
        head = [{"text": ids(before)}] if before else []
        return [*head, image, {"text": ids(prompt) + ids(after)}]

    def train_dataset(self):
        raise TaskDataError(
            f"task.name={self.cfg.name}: an evaluation benchmark without a training set "
            f"(eve-evaluate --task {self.cfg.name} --data-root DIR)"
        )

    def questions(self, split: str | None) -> list[BenchQuestion]:
        if not self.cfg.data_root:
            raise TaskDataError(
                f"{self.bench.title}: no data root (pass the directory of its files: {DATA_ROOT_HINT})"
            )
        return READERS[self.cfg.name](self.cfg.data_root, split)

    def score(
        self,
        model,
        split: str | None,
        *,
        device: str,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        predictions: str | None = None,
    ) -> dict:
        """The benchmark's scores of `split` (None: its default), with the per-question answers written to
        `predictions` (JSON lines; VQAv2: the EvalAI results file)."""
        if "tokenizer" not in vars(self):  # prepared (an instance attribute over the base method)
            self.prepare()
        questions = self.questions(split)
        rank, world = rank_and_world()
        was_training = model.training
        model.eval()
        answers, bad = self.answer(model.encoder, questions[rank::world], device, batch_size)
        model.train(was_training)
        for part_answers, part_bad in gather_objects((answers, bad))[1:]:
            answers.update(part_answers)
            bad.extend(part_bad)
        if questions and not answers:
            raise TaskDataError(f"{self.bench.title}: no image could be read ({len(bad)}; first: {bad[0]})")
        scored = [q for q in questions if q.key in answers and q.answers]
        out = SCORERS[self.cfg.name](scored, answers) if scored else {}
        out |= {"num_questions": len(questions), "num_scored": len(scored), "num_bad_images": len(bad)}
        if predictions and rank == 0:
            write_predictions(predictions, self.cfg.name, questions, answers)
        return out

    def answer(self, backbone, questions: list[BenchQuestion], device: str, batch_size: int):
        """-> ({key: answer text}, [unreadable image, ...]) for `questions`, by greedy decoding."""
        prompts = [self.question_docs(q.prompt) for q in questions]
        # By length, so that a batch's left padding stays short; any lengths may share a batch.
        members = sorted(range(len(prompts)), key=lambda i: sum(len(d.get("text", ())) for d in prompts[i]))
        answers: dict[str, str] = {}
        bad: list[str] = []
        for start in range(0, len(members), batch_size):
            chunk, images = [], []
            for i in members[start : start + batch_size]:
                image = self.load(questions[i].image)
                if image is None:
                    bad.append(image_name(questions[i]))
                else:
                    chunk.append(i)
                    images.append(image)
            if chunk:
                texts = self.generate(backbone, [prompts[i] for i in chunk], images, device)
                answers.update((questions[i].key, t) for i, t in zip(chunk, texts))
        if bad:
            log.warning("%d unreadable images left out (first: %s)", len(bad), bad[0])
        return answers, bad

    def load(self, image: str | bytes) -> torch.Tensor | None:
        """(3, S, S) uint8, or None when the file (or the bytes) cannot be decoded."""
        try:
            source = io.BytesIO(image) if isinstance(image, bytes) else image
            array = decode_image(source, self.ctx.image_size, self.cfg.image_geometry)
        except Exception:  # missing, truncated, not an image: all mean "unusable"
            return None
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def batch(self, backbone, prompts: list[list[dict]], images: list[torch.Tensor], device: str) -> dict:
        """The model batch of the questions' rows (`question_docs`), padded at the start, row i reading
        images[i]."""
        K = backbone.cfg.num_media_tokens
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = [layout_row([docs], self.media_id, K) for docs in prompts]
        batch = {k: v.to(device) for k, v in stack_rows(rows, pad_id=pad, left=True).items()}
        dtype = next(backbone.vision.parameters()).dtype
        batch["images"] = normalize_image(torch.stack(images).to(device), dtype, self.ctx.image_mean,
                                          self.ctx.image_std)  # fmt: skip
        n = len(prompts)
        batch["image_slot"] = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1).to(device)
        batch["num_slots"] = 1
        return batch

    def generate(
        self, backbone, prompts: list[list[dict]], images: list[torch.Tensor], device: str
    ) -> list[str]:
        """Greedy answers of the questions' rows (`question_docs`), each reading its own image."""
        eos = self.tokenizer.eos_token_id
        batch = self.batch(backbone, prompts, images, device)
        tokens = backbone.generate_greedy(batch, self.bench.max_new_tokens, -1 if eos is None else eos)
        texts = []
        for row in tokens.tolist():
            row = row[: row.index(eos)] if eos in row else row
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            texts.append(text.split("\n")[0].strip())
        return texts


def image_name(q: BenchQuestion) -> str:
    return q.image if isinstance(q.image, str) else f"question {q.question_id} (embedded image)"


def write_predictions(path: str, name: str, questions: list[BenchQuestion], answers: dict[str, str]) -> None:
    """JSON lines {question_id, prediction (null: image unreadable), answers, + meta} in file order,
    atomically; VQAv2: the evaluation server's results file [{question_id, answer}] for every question."""
    if name == "vqav2":
        from eve_ds.tasks.vqa.eval import write_results

        preds = {q.question_id: answers[q.key] for q in questions if q.key in answers}
        write_results(path, preds, [q.question_id for q in questions], fallback="")
        return
    lines = []
    for q in questions:
        meta = {k: v for k, v in q.meta.items() if k != "options"}
        record = {"question_id": q.question_id, "prediction": answers.get(q.key), "answers": list(q.answers)}
        lines.append(json.dumps(record | meta, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


for _name in BENCHMARKS:
    register_task(_name)(EVLMBenchTask)
