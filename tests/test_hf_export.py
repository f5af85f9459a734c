"""Exports of a fine-tuned VQA run read by transformers alone: the HF export answers the question it was
fine-tuned for (AutoModelForVisualQuestionAnswering + AutoTokenizer + AutoImageProcessor, in a process
without eve_ds) with EVE-DS's logits; the native export's files do not confuse AutoTokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from infer_fixtures import tiny_run
from test_infer import vqa_questions

from eve_ds.cli.convert import main as convert_main
from eve_ds.infer import VQAPredictor
from eve_ds.infer import preprocess as pre

# Runs in a fresh interpreter where eve_ds, DeepSpeed and timm cannot be imported: what a user of the export
# has. argv: export dir, then JSON [[image path, question], ...]; prints JSON {"logits", "hidden_err"}.
HF_SCRIPT = """
import json, sys
sys.modules.update(deepspeed=None, timm=None, eve_ds=None)
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForVisualQuestionAnswering, AutoTokenizer

d, pairs = sys.argv[1], json.loads(sys.argv[2])
proc = AutoImageProcessor.from_pretrained(d, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
vqa = AutoModelForVisualQuestionAnswering.from_pretrained(d, trust_remote_code=True).eval()
enc = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
pix = proc([Image.open(p) for p, _ in pairs], return_tensors="pt")["pixel_values"]
clean = sys.modules[type(vqa).__module__].clean_text  # the modeling file's text rule (docs/conversion.md)
assert clean("Why-Not?", {"kind": "question", "max_words": 50}) == "why not"
pairs = [[p, clean(q, vqa.config.text_rule)] for p, q in pairs]
t = tok([q for _, q in pairs], padding="max_length", max_length=vqa.config.max_text_len, return_tensors="pt")
inputs = dict(pixel_values=pix, input_ids=t["input_ids"], attention_mask=t["attention_mask"])
with torch.no_grad():
    out = vqa(**inputs)
    hidden = enc(**inputs).last_hidden_state
err = (hidden - out.last_hidden_state).abs().max().item()
print(json.dumps({"logits": out.logits.tolist(), "hidden_err": err, "answers": vqa.config.id2label}))
"""


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    return tiny_run("vqa", tmp_path_factory.mktemp("hf"))


def test_hf_export_answers_vqa_like_eve_ds_without_eve_ds(vqa_run, tmp_path, monkeypatch):
    run, data = vqa_run
    dst = tmp_path / "hf"
    assert convert_main(["export", str(run), str(dst), "--format", "hf"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForVisualQuestionAnswering"] == "modeling_eve.EVEForVQA"
    assert cfg["auto_map"]["AutoModel"] == "modeling_eve.EVEHFModel"
    assert cfg["text_rule"] is None  # the run tokenized its texts as they are
    vqa = VQAPredictor.from_pretrained(run)
    assert [cfg["id2label"][str(i)] for i in range(len(vqa.vocab))] == vqa.vocab.answers
    proc = json.loads((dst / "preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": 64, "width": 64}
    assert proc["image_mean"] == pytest.approx([0.485, 0.456, 0.406])  # the run sets none: ImageNet's

    pairs = [[path, q] for _, path, q in vqa_questions(data)[:4]]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(dst), json.dumps(pairs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=os.environ.copy(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["hidden_err"] < 1e-5  # AutoModel: the same encoder, without the head
    batch, bad = pre.vqa_batch([p for p, _ in pairs], [q for _, q in pairs], vqa.vocab, vqa.ctx)
    assert bad == []
    ref = vqa.logits(batch)
    hf = torch.tensor(out["logits"])
    assert hf.shape == ref.shape == (4, len(vqa.vocab))
    assert (hf - ref).abs().max() < 1e-5
    assert ref.std() > 0.01  # distinct logits: the comparison could fail


def test_hf_image_processor_states_the_runs_normalisation():
    from eve_ds.convert.hf_export import image_processor
    from eve_ds.models.config import get_config
    from eve_ds.models.eve import EVEModel

    enc = EVEModel(get_config("eve_tiny"))
    cfg = {"run": {"data": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]}}}
    p = image_processor(enc, cfg)
    assert (list(p.image_mean), list(p.image_std)) == ([0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert p.size == {"shortest_edge": enc.cfg.image_size}


def test_native_export_loads_with_autotokenizer(vqa_run, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    run, _ = vqa_run
    dst = tmp_path / "native"
    assert convert_main(["export", str(run), str(dst)]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["weights_dtype"] == "fp32" and "dtype" not in cfg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(dst)
    ctx = VQAPredictor.from_pretrained(dst).ctx
    q = "what color is the circle?"
    assert tok(q)["input_ids"] == ctx.tokenizer(q)["input_ids"]
    # an export written before the key was renamed is still read, and re-exported with the new key
    cfg["dtype"] = cfg.pop("weights_dtype")
    (dst / "config.json").write_text(json.dumps(cfg))
    assert convert_main(["export", str(dst), str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["weights_dtype"] == "fp32" and "dtype" not in again
