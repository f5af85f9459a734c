"""Inference on one's own inputs: predictors over a trained checkpoint (`api`), Grad-CAM and routing
pictures (`attribution`), with the evaluation's own preprocessing (`preprocess`)."""

from eve_ds.infer.api import (
    Answer,
    Embedder,
    Judgement,
    MissingHeadError,
    NLVR2Judge,
    Predictor,
    Ranking,
    Retriever,
    VQAPredictor,
)
from eve_ds.infer.preprocess import UnreadableImageError

__all__ = [
    "Answer",
    "Embedder",
    "Judgement",
    "MissingHeadError",
    "NLVR2Judge",
    "Predictor",
    "Ranking",
    "Retriever",
    "UnreadableImageError",
    "VQAPredictor",
]
