"""Explanations of a ranking: MLLM-written reasons, calibrated confidence, ERM re-ranking, relevance heatmaps.

Names load on first use, so `retriever.explain.calibration` (numpy only) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Explainer": "retriever.explain.explainer",
    "make_reranker": "retriever.explain.explainer",
    "model_lock": "retriever.explain.explainer",
    "Calibration": "retriever.explain.calibration",
    "auroc": "retriever.explain.calibration",
    "CheckedReason": "retriever.explain.evidence",
    "Evidence": "retriever.explain.evidence",
    "EvidenceFinder": "retriever.explain.evidence",
    "Match": "retriever.explain.evidence",
    "check_reason": "retriever.explain.evidence",
    "plain_sentence": "retriever.explain.evidence",
    "ValExample": "retriever.explain.calibration",
    "DEFAULT_TEMPERATURE": "retriever.explain.calibration",
    "calibration_ece": "retriever.explain.calibration",
    "erm_order": "retriever.explain.calibration",
    "fit_all": "retriever.explain.calibration",
    "fit_calibration": "retriever.explain.calibration",
    "fit_rerank_weight": "retriever.explain.calibration",
    "similarity_probs": "retriever.explain.calibration",
}

if TYPE_CHECKING:
    from retriever.explain.calibration import (
        DEFAULT_TEMPERATURE,
        Calibration,
        ValExample,
        auroc,
        calibration_ece,
        erm_order,
        fit_all,
        fit_calibration,
        fit_rerank_weight,
        similarity_probs,
    )
    from retriever.explain.evidence import (
        CheckedReason,
        Evidence,
        EvidenceFinder,
        Match,
        check_reason,
        plain_sentence,
    )
    from retriever.explain.explainer import Explainer, make_reranker, model_lock


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retriever.explain' has no attribute {name!r}")


__all__ = [
    "DEFAULT_TEMPERATURE",
    "Calibration",
    "CheckedReason",
    "Evidence",
    "EvidenceFinder",
    "Match",
    "auroc",
    "check_reason",
    "plain_sentence",
    "Explainer",
    "ValExample",
    "calibration_ece",
    "erm_order",
    "fit_all",
    "fit_calibration",
    "fit_rerank_weight",
    "make_reranker",
    "model_lock",
    "similarity_probs",
]
