"""task.text_preprocess: the official fine-tuning code's question and caption cleaning, and the one path
(`Task.tokenizer` / `Task.eval_context`) through which training, evaluation and the inference API apply it.

The expected strings were worked out by hand from the official rules (lower-case; `, . ' ! ? " ( ) * # : ; ~`
removed, and the back-quote for captions; `-` and `/` -> space; questions: trailing spaces dropped, words
counted by single spaces; captions: `<person>` -> person, white space collapsed, ends stripped)."""

from __future__ import annotations

import pickle

import pytest

from eve_ds.data import load_tokenizer
from eve_ds.data.text import (
    RuledTokenizer,
    TextPreprocessError,
    TextRule,
    official_caption,
    official_question,
    with_rule,
)
from eve_ds.models.config import eve_tiny
from eve_ds.tasks.base import TaskContext, build_task
from eve_ds.tasks.config import TaskConfig
from eve_ds.utils.config import ConfigError


@pytest.mark.parametrize(
    "text, words, expected",
    [
        ("What's the man's-name/title?", 30, "whats the mans name title"),
        ("Is it  RED?!  ", 30, "is it  red"),  # inner double space kept, trailing spaces dropped
        ("  why?", 30, "  why"),  # leading spaces kept
        ("a  b c d", 3, "a  b"),  # the empty word between the two spaces counts
        ("one two three", 3, "one two three"),
        ('it`s (really) #1: ~ok~; "yes"', 30, "it`s really 1 ok yes"),  # back-quote kept in questions
        ("what\tis\nthis?", 30, "what\tis\nthis"),  # tabs and newlines are not spaces here
        ("<PERSON> rides", 30, "<person> rides"),  # no <person> rule for questions
        ("A&B [c] {d} @e $f %g +h =i _j?", 30, "a&b [c] {d} @e $f %g +h =i _j"),  # other marks stay
        ("Café ÉTÉ?", 30, "café été"),
        ("...", 30, ""),  # an empty question is no error
    ],
)
def test_official_question(text, words, expected):
    assert official_question(text, words) == expected


@pytest.mark.parametrize(
    "text, words, expected",
    [
        ("  A dog -- running!  ", 30, "a dog running"),
        ("it`s a <PERSON>'s bike", 30, "its a persons bike"),  # <person> in any case, after lower-casing
        ("<per.son> waves", 30, "person waves"),  # the marks go first, then <person>
        ("two\tcats\n\non a  mat.", 30, "two cats on a mat"),
        ("one two three four", 2, "one two"),
        ("left/right and up-down", 30, "left right and up down"),
        ("Zwei Hunde (klein)", None, "zwei hunde klein"),
    ],
)
def test_official_caption(text, words, expected):
    assert official_caption(text, words) == expected


def test_a_caption_without_words_is_a_clear_error():
    with pytest.raises(TextPreprocessError, match=r"task\.text_preprocess=official.*'\?!\.'"):
        official_caption("?!.", 30)


def test_ruled_tokenizer_tokenises_the_cleaned_text():
    tok = load_tokenizer("bert-base-uncased")
    ruled = with_rule(tok, TextRule("question", 3))
    assert isinstance(ruled, RuledTokenizer) and ruled.pad_token_id == tok.pad_token_id
    kw = dict(max_length=12, truncation=True, padding="max_length")
    assert (
        ruled(["What's THAT thing, there?"], **kw)["input_ids"]
        == tok(["whats that thing"], **kw)["input_ids"]
    )
    assert ruled("Hi-there")["input_ids"] == tok("hi there")["input_ids"]
    assert with_rule(tok, TextRule()) is tok and with_rule(ruled, TextRule()) is tok  # never stacked
    again = pickle.loads(pickle.dumps(ruled))  # DataLoader workers receive the collate's tokenizer
    assert again("A-B")["input_ids"] == tok("a b")["input_ids"]


def _task(name: str, **kw):
    cfg = TaskConfig(name=name, synthetic=True, **kw)
    cfg.validate()
    ctx = TaskContext(
        tokenizer=load_tokenizer("bert-base-uncased"), cache_dir="", image_size=64, max_text_len=40
    )
    return build_task(cfg, ctx)


def test_each_task_takes_its_official_rule_and_default_is_the_text_as_is():
    plain = _task("vqa")  # default: none, the run's tokenizer itself
    assert plain.tokenizer(train=True) is plain.ctx.tokenizer is plain.eval_context().tokenizer
    official = {
        "vqa": (TextRule("question", 30), TextRule("question", 50)),
        "retrieval": (TextRule("caption", 30), TextRule("caption", 30)),
        "nlvr2": (TextRule("caption", 40), TextRule("caption", 40)),
    }
    for name, (train, evaluation) in official.items():
        task = _task(name, text_preprocess="official")
        assert (task.text_rule(True), task.text_rule(False)) == (train, evaluation), name
        assert task.tokenizer(True).rule == train and task.eval_context().tokenizer.rule == evaluation
        assert task.eval_context().image_size == 64  # the rest of the context is the run's
    limited = _task("vqa", text_preprocess="official", text_max_words=5)
    assert limited.text_rule(True) == limited.text_rule(False) == TextRule("question", 5)
    with pytest.raises(ConfigError, match=r"task\.text_preprocess"):
        _task("vqa", text_preprocess="lower")
    with pytest.raises(ConfigError, match=r"task\.text_max_words"):
        _task("vqa", text_preprocess="official", text_max_words=0)


def test_collate_and_inference_context_apply_the_rule(tmp_path):
    import numpy as np

    from eve_ds.infer import preprocess as pre
    from eve_ds.tasks.vqa.data import vqa_collate

    task = _task("vqa", text_preprocess="official")
    item = {"image": np.zeros((64, 64, 3), np.uint8), "question": "Is the RED-circle left?", "question_id": 1}
    item["targets"] = __import__("torch").zeros(3)
    batch = vqa_collate([item], task.tokenizer(train=True), max_text_len=12)
    plain = vqa_collate([{**item, "question": "is the red circle left"}], task.ctx.tokenizer, max_text_len=12)
    assert batch["text_ids"].tolist() == plain["text_ids"].tolist()
    config = {"run": {"task": {"text_preprocess": "official"}}}
    ctx = pre.context(config, eve_tiny(), "retrieval")
    assert ctx.tokenizer.rule == TextRule("caption", 30)
    assert not isinstance(pre.context({}, eve_tiny(), "retrieval").tokenizer, RuledTokenizer)
    assert not isinstance(pre.context(config, eve_tiny()).tokenizer, RuledTokenizer)  # the bare encoder


TEXTS = [
    "What's the man's-name/title?",
    "Is it  RED?!  ",
    "  why?",
    "a  b c d e",
    "it`s a <PERSON>'s bike",
    "two\tcats\n\non a  mat.",
    "left/right and up-down",
    "Café ÉTÉ?",
    "one two three four five six",
]


@pytest.mark.parametrize("kind", ["question", "caption"])
@pytest.mark.parametrize("words", [None, 3, 30])
def test_hf_export_clean_text_equals_the_rule(kind, words):
    """The standalone copy in the HF export's modeling file cleans as eve_ds.data.text does."""
    from eve_ds.hf.modeling_eve import clean_text

    for text in TEXTS:
        assert clean_text(text, {"kind": kind, "max_words": words}) == TextRule(kind, words)(text), text
    assert clean_text(TEXTS[0], None) == TEXTS[0]
