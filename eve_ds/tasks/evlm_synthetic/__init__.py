"""EVLM on synthetic captions: scenes from `data/synthetic.py`, a word-level vocabulary, `caption_lm`."""
