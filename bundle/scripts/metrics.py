"""Classification metrics reported by `run evaluating`: accuracy and per-class / macro precision, recall,
specificity, F1 and one-vs-rest AUC, from predicted probabilities and integer labels.

The paper reports precision, recall, specificity and F1 per grade and their macro averages; MONAI's
`ConfusionMatrixMetric` works on one-hot tensors batch by batch, while evaluation here has all predictions
at hand at the end, so the counts are taken once from one confusion matrix. AUC uses MONAI's
`compute_roc_auc`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc


def confusion_matrix(labels: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts with true classes on rows and predicted classes on columns."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for true, pred in zip(labels, predicted, strict=True):
        matrix[int(true), int(pred)] += 1
    return matrix


def _safe_ratio(numerator: float, denominator: float) -> float | None:
    """None (JSON null) where a ratio is undefined, e.g. recall of a class absent from the test set."""
    return float(numerator / denominator) if denominator > 0 else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def one_vs_rest_auc(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """AUC of each class against the rest; None for a class that is absent or is the only one present."""
    aucs: list[float | None] = []
    for c in range(num_classes):
        positives = labels == c
        if positives.all() or not positives.any():
            aucs.append(None)
            continue
        auc = compute_roc_auc(torch.as_tensor(probabilities[:, c]), torch.as_tensor(positives.astype(np.float32)))
        aucs.append(float(auc))
    return aucs


def classification_metrics(
    probabilities: np.ndarray | Sequence[Sequence[float]],
    labels: np.ndarray | Sequence[int],
    class_names: Sequence[str],
) -> dict:
    """All figures for one set of predictions, as a JSON-ready dict.

    ``probabilities`` is ``[N, C]`` (rows need not be normalised), ``labels`` is ``[N]`` integer classes.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes:
        raise ValueError(f"probabilities must be [N, {num_classes}], got {probabilities.shape}")
    if probabilities.shape[0] != labels.shape[0]:
        raise ValueError(f"{probabilities.shape[0]} predictions but {labels.shape[0]} labels")
    if probabilities.shape[0] == 0:
        raise ValueError("no predictions to evaluate")

    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, num_classes)
    total = matrix.sum()
    aucs = one_vs_rest_auc(probabilities, labels, num_classes)

    per_class = {}
    for c, name in enumerate(class_names):
        tp = matrix[c, c]
        fp = matrix[:, c].sum() - tp
        fn = matrix[c, :].sum() - tp
        tn = total - tp - fp - fn
        support = tp + fn
        # A class that is present but never predicted has precision 0 and F1 0 (scikit-learn's
        # zero_division=0), not "undefined": leaving it out would flatter the macro averages.
        precision = _safe_ratio(tp, tp + fp) if tp + fp > 0 else (0.0 if support > 0 else None)
        recall = _safe_ratio(tp, support)
        f1 = None
        if precision is not None and recall is not None:
            f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        per_class[name] = {
            "support": int(matrix[c, :].sum()),
            "precision": precision,
            "recall": recall,
            "specificity": _safe_ratio(tn, tn + fp),
            "f1": f1,
            "auc": aucs[c],
        }

    macro = {
        key: _mean_defined([per_class[name][key] for name in class_names])
        for key in ("precision", "recall", "specificity", "f1", "auc")
    }
    return {
        "n": int(total),
        "accuracy": float(np.trace(matrix) / total),
        "macro": macro,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }


def nll_of_probabilities(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-probability of the true class, for outputs that are already probabilities."""
    probabilities = torch.as_tensor(probabilities)
    labels = torch.as_tensor(labels, device=probabilities.device).long().reshape(-1)
    log_p = torch.log(probabilities.reshape(labels.numel(), -1).float().clamp_min(1e-12))
    return torch.nn.functional.nll_loss(log_p, labels)
