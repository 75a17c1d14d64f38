"""Classification metrics from label ids, in plain Python."""

from __future__ import annotations

from collections.abc import Sequence


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], n_labels: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def classification_scores(truth: Sequence[int], predicted: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean F1 over every label, 0 for a label never predicted nor true)."""
    if not truth:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    matrix = confusion_matrix(truth, predicted, n_labels)
    correct = sum(matrix[i][i] for i in range(n_labels))
    f1s = []
    for label in range(n_labels):
        tp = matrix[label][label]
        fp = sum(matrix[t][label] for t in range(n_labels)) - tp
        fn = sum(matrix[label]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / len(truth), "macro_f1": sum(f1s) / n_labels}
