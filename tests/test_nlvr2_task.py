"""NLVR2 through the shared trainer: the two heads (shapes; the bi-attention head blind to text padding),
`eve-finetune` on a small synthetic set in the official layout, `eve-evaluate --task nlvr2` on dev and
test1, and unreadable images (skipped and counted in training, an error in evaluation unless asked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from eve_ds.cli.evaluate import main as evaluate
from eve_ds.cli.finetune import main as finetune
from eve_ds.data.pipeline import load_tokenizer
from eve_ds.models.config import eve_tiny
from eve_ds.objectives import ObjectiveConfig, PretrainingModel
from eve_ds.tasks.base import TaskContext
from eve_ds.tasks.config import TaskConfig
from eve_ds.tasks.nlvr2.data import read_nlvr2
from eve_ds.tasks.nlvr2.synthetic import TEMPLATES, ensure_synthetic_nlvr2
from eve_ds.tasks.nlvr2.task import NLVR2Task
from eve_ds.utils.image import normalize_image

SIZES = {"num_train": 32, "num_dev": 12, "num_test": 8}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nlvr2_cache")


@pytest.fixture(scope="module")
def root(cache) -> str:
    """The synthetic set the fine-tuning runs below generate (same parameters, so the same directory)."""
    return ensure_synthetic_nlvr2(str(cache), seed=0, image_size=64, **SIZES)


def overrides(cache, **extra) -> list[str]:
    base = {
        "data.cache_dir": cache,
        "task.synthetic_num_train": SIZES["num_train"],
        "task.synthetic_num_val": SIZES["num_dev"],
        "task.synthetic_num_test": SIZES["num_test"],
        "train.init_from": "none",
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.max_steps": 4,
        "train.checkpoint_every": 4,
        "train.log_every": 1,
        "data.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def pairs_batch(lengths: list[int], L: int = 12) -> dict:
    """B = len(lengths) sentences (real lengths given, padded to L with id 0), random image pairs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1000, 2000, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    pixels = torch.randint(0, 256, (len(lengths), 2, 3, 64, 64), dtype=torch.uint8, generator=g)
    return {
        "image": normalize_image(pixels),
        "text_ids": ids,
        "text_mask": mask,
        "label": torch.tensor([1, 0, 1]),
    }


def nlvr2_model(head: str) -> PretrainingModel:
    torch.manual_seed(0)
    return PretrainingModel(
        eve_tiny(), ObjectiveConfig(objectives=["nlvr2"], heads={"nlvr2": {"head": head}})
    )


@torch.no_grad()
def test_biattention_head_ignores_text_padding():
    model = nlvr2_model("biattn").eval()
    b = pairs_batch([5, 12, 8])
    ref = model(b)["nlvr2_logits"]
    junk = b["text_ids"].clone()
    pad = b["text_mask"] == 0
    junk[pad] = torch.randint(1000, 2000, (int(pad.sum()),), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(dict(b, text_ids=junk))["nlvr2_logits"], ref)
    # ... while a real token does matter (the comparison above can fail).
    real = b["text_ids"].clone()
    real[0, 2] = 1999 if real[0, 2] != 1999 else 1998
    assert (model(dict(b, text_ids=real))["nlvr2_logits"][0] - ref[0]).abs().max() > 1e-5


@pytest.mark.parametrize("head", ["biattn", "concat"])
def test_heads_give_two_logits_per_statement_a_loss_and_accuracy(head):
    model = nlvr2_model(head)
    b = pairs_batch([5, 12, 8])
    out = model(b)
    assert out["nlvr2_logits"].shape == (3, 2)
    assert out["nlvr2_loss"].shape == () and out["nlvr2_loss"].detach() > 0
    want_acc = (out["nlvr2_logits"].argmax(1) == b["label"]).float().mean()
    assert torch.equal(out["nlvr2_acc"], want_acc)
    out["loss"].backward()
    head_grads = [p.grad for p in model.objectives["nlvr2"].parameters()]
    assert all(g is not None for g in head_grads) and sum(float(g.abs().sum()) for g in head_grads) > 0
    # Left and right are different inputs of the head: swapping the images changes the logits.
    swapped = dict(b, image=b["image"].flip(1))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(swapped)["nlvr2_logits"], model(b)["nlvr2_logits"])
    with pytest.raises(ValueError, match=r"\(B, 2, C, H, W\)"):
        model(dict(b, image=b["image"][:, 0]))


def test_finetune_writes_nlvr2_acc_and_eve_evaluate_scores_dev_and_test1(tmp_path, cache, root, capsys):
    run = tmp_path / "run"
    assert finetune(["--config", "nlvr2_tiny_synthetic", "--run-dir", str(run), *overrides(cache)]) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 4 and "train_nlvr2_loss" in final
    assert final["num_examples"] == SIZES["num_dev"] and final["num_skipped"] == 0
    assert 0.0 <= final["nlvr2_acc"] <= 1.0
    assert {k.split("/")[1] for k in final if k.startswith("nlvr2_acc/")} == set(TEMPLATES)

    capsys.readouterr()
    argv = ["--checkpoint", str(run), "--task", "nlvr2", "--data-root", root, "--json"]
    assert evaluate([*argv, "--split", "dev"]) == 0
    dev = json.loads(capsys.readouterr().out)
    assert dev["num_examples"] == SIZES["num_dev"]
    assert dev["nlvr2_acc"] == final["nlvr2_acc"]  # the same model on the same split, loaded back

    pred = tmp_path / "test1.csv"
    assert evaluate([*argv, "--split", "test1", "--predictions", str(pred)]) == 0
    test = json.loads(capsys.readouterr().out)
    assert test["num_examples"] == SIZES["num_test"]
    lines = [line.split(",") for line in pred.read_text().splitlines()]
    examples, _ = read_nlvr2(root, "test1")
    assert [i for i, _ in lines] == [e.identifier for e in examples]
    assert {p for _, p in lines} <= {"True", "False"}
    hits = sum((p == "True") == bool(e.label) for (_, p), e in zip(lines, examples))
    assert hits / len(examples) == test["nlvr2_acc"]

    # Evaluation: a missing and an undecodable image are errors, or skipped and counted when asked.
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    dev_examples, _ = read_nlvr2(str(bad), "dev")
    Path(dev_examples[0].left_path).unlink()  # pair 0: statements 0 and 1
    Path(dev_examples[2].right_path).write_bytes(b"not a png")  # pair 1: statements 2 and 3
    bad_argv = [
        "--checkpoint",
        str(run),
        "--task",
        "nlvr2",
        "--data-root",
        str(bad),
        "--split",
        "dev",
        "--json",
    ]
    assert evaluate(bad_argv) == 2
    assert dev_examples[0].left_path in capsys.readouterr().err
    Path(dev_examples[0].left_path).write_bytes(Path(dev_examples[0].right_path).read_bytes())
    assert evaluate(bad_argv) == 2
    assert dev_examples[2].right_path in capsys.readouterr().err
    Path(dev_examples[0].left_path).unlink()
    assert evaluate([*bad_argv, "--skip-bad-images"]) == 0
    skipped = json.loads(capsys.readouterr().out)
    assert skipped["num_examples"] == SIZES["num_dev"] - 4 and skipped["num_skipped"] == 4


def test_training_skips_and_counts_missing_and_undecodable_images(tmp_path, root):
    data = tmp_path / "nlvr2"
    shutil.copytree(root, data)
    train, _ = read_nlvr2(str(data), "train")
    Path(train[0].right_path).unlink()  # pair 0 (statements 0, 1): skipped at read time
    Path(train[2].left_path).write_bytes(b"\x89PNG truncated")  # pair 1: skipped by the collate
    tokenizer = load_tokenizer("bert-base-uncased")
    task = NLVR2Task(
        TaskConfig(name="nlvr2", data_root=str(data)), TaskContext(tokenizer, "", 64, 40, num_workers=0)
    )
    task.prepare()
    assert task.counts == {"examples": SIZES["num_train"] - 2, "missing_image": 2}
    dataset, collate = task.train_dataset()
    assert len(dataset) == SIZES["num_train"] - 2
    batch = collate([dataset[i] for i in range(4)])  # statements 2, 3 (undecodable), 4, 5
    assert batch["num_skipped"] == 2 and batch["identifier"] == [train[4].identifier, train[5].identifier]
    assert batch["image"].shape == (2, 2, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert task.objective_options() == {"nlvr2": {"head": "biattn"}}
