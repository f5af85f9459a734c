"""An official-layout checkpoint, end to end on CPU: `eve-convert import-official` (with a tokenizer folder
and, for VQA, an answer list), a few `eve-finetune` steps on the synthetic VQA and retrieval sets from
`train.init_from=<import>` with the import's `run_overrides`, then `eve-evaluate` of the run.

What must hold: the run's encoder starts from the imported tensors (a few small steps away from them
after training), the VQA head keeps the list's answers in the list's order (not the data's vocabulary),
the official options reach the run (bias-free ITC projections, match-logit re-ranking, the official text
preprocessing), and the metrics are there and in range.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_official_import import D, official_checkpoint
from transformers import BertTokenizer

from eve_ds.cli.convert import main as convert
from eve_ds.cli.evaluate import main as evaluate
from eve_ds.cli.finetune import main as finetune
from eve_ds.convert import load_pretraining_model
from eve_ds.data.synthetic import COLOURS, RELATIONS, SHAPES, SIZES

# A word-level vocabulary of the synthetic questions and captions (unknown words become [UNK]), under the
# checkpoint's 120 embedding rows.
WORDS = [*COLOURS, *SHAPES, *SIZES, *RELATIONS, "what", "color", "shape", "is", "the", "a", "there"]
WORDS += ["how", "many", "are", "of", "to", "object", "and", "with", "scene", "in", "it", "its", "yes", "no"]
WORDS += [str(n) for n in range(10)]
# The official answer list: 5 answers in an order of our own (the data's vocabulary is bigger and sorted
# by frequency), so the run can only end up with it by taking it from the import.
ANSWERS = ["square", "no", "red", "2", "yes"]
RUN = {
    "train.global_batch_size": 8,
    "train.micro_batch_size": 8,
    "train.max_steps": 3,
    "train.checkpoint_every": 3,
    "train.log_every": 1,
    "data.num_workers": 0,
    "model.image_size": 32,  # the checkpoint's own (2 x 2 patches of 16)
    "optim.warmup_steps": 1,
}
SETS = {
    "vqa": ("vqa_tiny_synthetic", {"task.synthetic_num_train": 24, "task.synthetic_num_val": 12}),
    "retrieval": ("retrieval_tiny_synthetic", {"task.synthetic_num_train": 24, "task.synthetic_num_val": 8}),
}
SETS["vqa"][1].update({"task.synthetic_num_test": 4, "task.minival_images": 6})
SETS["retrieval"][1].update({"task.synthetic_num_test": 4, "task.rerank_k": 8})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root / "tok")
    return root / "tok"


def _import(task: str, root: Path, tokenizer: Path, capsys) -> tuple[Path, dict]:
    ck = official_checkpoint(task, seed=1)
    if task == "vqa":  # a head of as many rows as the answer list
        g = torch.Generator().manual_seed(2)
        ck["model"]["output.3.weight"] = 0.1 * torch.randn(len(ANSWERS), 2 * D, generator=g)
        ck["model"]["output.3.bias"] = torch.zeros(len(ANSWERS))
    torch.save(ck, root / f"{task}.th")
    argv = [
        "import-official",
        str(root / f"{task}.th"),
        str(root / f"{task}_import"),
        "--tokenizer",
        str(tokenizer),
    ]
    if task == "vqa":
        (root / "answer_list.json").write_text(json.dumps(ANSWERS))
        argv += ["--answer-list", str(root / "answer_list.json")]
    capsys.readouterr()
    assert convert(argv) == 0
    dst = root / f"{task}_import"
    return dst, json.loads((dst / "config.json").read_text())["official"]


def _finetune(task: str, root: Path, dst: Path, report: dict) -> Path:
    config, extra = SETS[task]
    run = root / f"{task}_run"
    opts = {**RUN, **extra, "data.cache_dir": root / "cache", "train.init_from": dst}
    argv = ["--config", config, "--run-dir", str(run), *report["run_overrides"]]
    assert finetune([*argv, *[f"{k}={v}" for k, v in opts.items()]]) == 0
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 3
    return run


def _encoder_moved_a_little(dst: Path, run: Path) -> None:
    """Every encoder tensor of the run is within a few AdamW steps of the import's, and some moved."""
    start, _ = load_pretraining_model(dst)
    end, _ = load_pretraining_model(run)
    a, b = start.state_dict(), end.state_dict()
    enc = [k for k in a if k.startswith("encoder.")]
    assert enc and all(k in b for k in enc)
    moved = {k: float((a[k] - b[k]).abs().max()) for k in enc}
    assert max(moved.values()) < 0.05, max(moved.items(), key=lambda kv: kv[1])  # 3 steps of lr 5e-4
    assert sum(v > 0 for v in moved.values()) > len(enc) // 2  # and it trained
    fresh = torch.nn.init.trunc_normal_(torch.empty_like(a["encoder.word_embed.weight"]), std=0.02)
    assert float((fresh - a["encoder.word_embed.weight"]).abs().max()) > 0.5  # a fresh init is far away


def test_import_finetune_evaluate_vqa(tmp_path, tokenizer_dir, capsys, one_thread):
    dst, report = _import("vqa", tmp_path, tokenizer_dir, capsys)
    assert "task.text_preprocess=official" in report["run_overrides"]
    run = _finetune("vqa", tmp_path, dst, report)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (
        cfg["task"]["text_preprocess"] == "official" and cfg["objective"]["heads"]["vqa"]["num_answers"] == 5
    )
    _encoder_moved_a_little(dst, run)
    model, saved = load_pretraining_model(run)
    assert saved["task"]["answer_vocab"]["answers"] == ANSWERS  # the list's answers, in its order
    assert model.objectives["vqa"].head[3].weight.shape[0] == len(ANSWERS)
    capsys.readouterr()
    assert evaluate(["--checkpoint", str(run), "--task", "vqa", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_questions"] > 0 and 0.0 <= metrics["vqa_score"] <= 1.0
    # the import itself evaluates too (its tokenizer, answer list and text rule from its config)
    data = next((tmp_path / "cache").glob("synthetic-vqa-*"))
    argv = ["--checkpoint", str(dst), "--task", "vqa", "--data-root", str(data), "--split", "val", "--json"]
    assert evaluate(argv) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["vqa_score"] <= 1.0
    # what eve-evaluate built for both: the VQA task with the official evaluation text rule
    from eve_ds.data.text import TextRule
    from eve_ds.train.evaluation import EvalRequest, checkpoint_task, run_config

    for path in (dst, run):
        model, config = load_pretraining_model(path)
        task = checkpoint_task(
            model, config, EvalRequest(task="vqa", data_root=str(data)), run_config(config)
        )
        assert task.eval_context().tokenizer.rule == TextRule("question", 50), path
        assert task.vocab.answers == ANSWERS


def test_import_finetune_evaluate_retrieval(tmp_path, tokenizer_dir, capsys, one_thread):
    dst, report = _import("retrieval", tmp_path, tokenizer_dir, capsys)
    run = _finetune("retrieval", tmp_path, dst, report)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["task"]["text_preprocess"] == "official"
    obj = cfg["objective"]
    assert (obj["itc_proj_bias"], obj["itc_eval_final_norm"], obj["itm_rerank_score"]) == (
        False,
        False,
        "match_logit",
    )
    _encoder_moved_a_little(dst, run)
    model, _ = load_pretraining_model(run)
    assert (
        model.objectives["itc"].image_proj.bias is None
        and model.objectives["itc"].image_proj.out_features == D
    )
    capsys.readouterr()
    assert evaluate(["--checkpoint", str(run), "--task", "retrieval", "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_images"] == 4 and metrics["num_texts"] >= 12
    for key in ("tr_r1", "ir_r5", "r_mean", "itc_r_mean"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["tr_r10"] == metrics["ir_r10"] == 100.0  # 4 images: every one is in the top 10


def test_init_answer_list_must_name_every_head_row():
    """train.init_from's answers replace the data's; a list that is not the head's rows is refused."""
    from eve_ds.data import load_tokenizer
    from eve_ds.tasks.base import TaskContext, build_task
    from eve_ds.tasks.config import TaskConfig
    from eve_ds.tasks.vqa.data import AnswerVocab, VQADataError

    ctx = TaskContext(tokenizer=load_tokenizer(), cache_dir="", image_size=32, max_text_len=8)
    task = build_task(TaskConfig(name="vqa", synthetic=True), ctx)
    own = AnswerVocab(["a", "b", "c"])

    def saved(rows, answers=None):
        out = {"objective": {"heads": {"vqa": {"num_answers": rows}}}}
        return out | ({"task": {"answer_vocab": {"answers": answers}}} if answers else {})

    task.vocab = own
    task.take_init_assets({"objective": {"objectives": ["mlm"]}}, "pre")  # no VQA head: the run's own
    task.take_init_assets(saved(3), "same-size")  # a head without a list but of the run's size
    assert task.vocab is own
    task.take_init_assets(saved(2, ["y", "x"]), "imp")
    assert task.vocab.answers == ["y", "x"]
    task.vocab = own
    with pytest.raises(
        VQADataError, match=r"train\.init_from=imp: its answer list has 2 answers but its VQA head 4"
    ):
        task.take_init_assets(saved(4, ["y", "x"]), "imp")
    with pytest.raises(VQADataError, match=r"its VQA head has 5 answers and no answer list, the run 3"):
        task.take_init_assets(saved(5), "imp")
