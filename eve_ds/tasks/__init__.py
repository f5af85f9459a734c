"""Downstream tasks (VQA v2, image-text retrieval, NLVR2): each is a reader for the dataset's official
files, a metric, and an objective in the registry; the trainer, engine and checkpoints are shared."""
