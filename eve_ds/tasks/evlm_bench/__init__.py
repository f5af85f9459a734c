"""EVLM on the public benchmarks (VQAv2, GQA, TextVQA, POPE, MME, MMBench): readers of their files as
distributed (`data`), their official metrics (`metrics`) and the generative evaluation task (`task`)."""
