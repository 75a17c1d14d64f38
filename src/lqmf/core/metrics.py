"""Quality metrics: classification scores from label ids (plain Python) and ROUGE (rouge-score)."""

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


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (Google's rouge-score, Porter stemming) of predictions vs references."""
    from rouge_score import rouge_scorer

    if not predictions:
        return dict.fromkeys(ROUGE_TYPES, 0.0)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for key, score in scorer.score(reference, prediction).items():
            totals[key] += score.fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}


# The held-out metric that says whether training helped, and whether higher is better.
LEARNING_METRICS = {"classification": ("eval_accuracy", True)}
DEFAULT_LEARNING_METRIC = ("eval_loss", False)


def learning_check(task: str, metrics: dict) -> dict | None:
    """Did the held-out metric improve over its value before training? None without both evaluations."""
    key, higher_is_better = LEARNING_METRICS.get(task, DEFAULT_LEARNING_METRIC)
    before = (metrics.get("initial") or {}).get(key)
    after = metrics.get(key)
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return None
    improved = after > before if higher_is_better else after < before
    return {"metric": key.removeprefix("eval_"), "before": before, "after": after, "improved": improved}


def no_improvement_warning(name: str, check: dict | None) -> str | None:
    """The line to print when training did not improve the held-out metric."""
    if check is None or check["improved"]:
        return None
    return (f"WARNING: adapter '{name}' did not improve held-out {check['metric']} "
            f"({check['before']:.4f} before training, {check['after']:.4f} after); it may be useless: "
            "try more epochs (--epochs), a higher learning rate (--lr) or more data")
