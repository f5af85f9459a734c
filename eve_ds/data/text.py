"""Text preprocessing before tokenisation: none (the text as it is) or the official EVE fine-tuning rules.

The official fine-tuning code cleans every question and caption before its tokenizer sees it:

- questions (VQA): lower-cased; the characters ``, . ' ! ? " ( ) * # : ; ~`` removed; ``-`` and ``/``
  become spaces; trailing spaces dropped; then cut to the first `max_words` of its split on single
  spaces (a run of spaces counts empty words, and leading spaces stay -- the tokenizer ignores both);
- captions (retrieval, NLVR2 statements): the same, with the back-quote removed too and ``<person>``
  (any case) read as ``person``; every run of white space becomes one space and the ends are stripped
  before the cut. A caption left empty is an error there, and here.

`TextRule` is one such choice; `RuledTokenizer` applies it in front of a tokenizer, so every collate,
the evaluations and the inference API tokenise through one call whatever the rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from eve_ds.utils.errors import UserError

TEXT_KINDS = ("none", "question", "caption")
_QUESTION_DROP = ",.'!?\"()*#:;~"
_CAPTION_DROP = _QUESTION_DROP + "`"
_QUESTION_TABLE = str.maketrans({**dict.fromkeys(_QUESTION_DROP), "-": " ", "/": " "})
_CAPTION_TABLE = str.maketrans({**dict.fromkeys(_CAPTION_DROP), "-": " ", "/": " "})
_SPACES = re.compile(r"\s+")


class TextPreprocessError(UserError, ValueError):
    """A text that a preprocessing rule cannot use (a caption with no word left)."""


def _first_words(text: str, max_words: int | None) -> str:
    words = text.split(" ")
    return text if max_words is None or len(words) <= max_words else " ".join(words[:max_words])


def official_question(text: str, max_words: int | None) -> str:
    """A VQA question as the official code feeds it to the tokenizer (module docstring)."""
    return _first_words(text.lower().translate(_QUESTION_TABLE).rstrip(" "), max_words)


def official_caption(text: str, max_words: int | None) -> str:
    """A caption or NLVR2 statement as the official code feeds it to the tokenizer (module docstring)."""
    out = text.lower().translate(_CAPTION_TABLE).replace("<person>", "person")
    out = _first_words(_SPACES.sub(" ", out).strip(" "), max_words)
    if not out:
        raise TextPreprocessError(
            f"task.text_preprocess=official: the caption {text!r} has no word left once punctuation is "
            "removed (the official code stops on it too); fix or drop it"
        )
    return out


@dataclass(frozen=True)
class TextRule:
    """kind: none | question | caption; max_words: the word limit (None: no limit)."""

    kind: str = "none"
    max_words: int | None = None

    def __call__(self, text: str) -> str:
        if self.kind == "question":
            return official_question(text, self.max_words)
        if self.kind == "caption":
            return official_caption(text, self.max_words)
        return text


class RuledTokenizer:
    """A tokenizer that applies `rule` to its text(s) first; every other attribute is the tokenizer's."""

    def __init__(self, tokenizer, rule: TextRule) -> None:
        self.tokenizer, self.rule = tokenizer, rule

    def __call__(self, text, *args, **kwargs):
        texts = self.rule(text) if isinstance(text, str) else [self.rule(t) for t in text]
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("tokenizer", "rule"):  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def with_rule(tokenizer, rule: TextRule):
    """`tokenizer` with `rule` in front (the tokenizer itself for kind none; a rule is never stacked)."""
    base = tokenizer.tokenizer if isinstance(tokenizer, RuledTokenizer) else tokenizer
    return base if rule.kind == "none" else RuledTokenizer(base, rule)
