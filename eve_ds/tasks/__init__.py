"""Downstream tasks (VQA v2, image-text retrieval, NLVR2): one subpackage each, with a reader for the
dataset's official files (`data`), a metric (`eval`), a synthetic set (`synthetic`) and the task (`task`),
over the shared base (`base`); the trainer, engine and checkpoints are the pre-training ones."""
