"""Evaluation plots: ROC, precision-recall, confusion, reliability and training curves.

Drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot global state, no
display needed); each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc as sklearn_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from model_training.calibration import expected_calibration_error, reliability_curve
from model_training.metrics import as_labels, as_probabilities

PathLike = str | Path


def _figure(width: float = 6.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def has_both_classes(y: npt.NDArray[np.int64]) -> bool:
    """Whether 0/1 labels hold both classes (ROC, PR and scoring need both)."""
    return bool(0 < int(y.sum()) < y.size)


def plot_roc(
    curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
    path: PathLike,
    title: str = "ROC curve (malignant vs benign)",
) -> Path:
    """ROC curves, one per named ``(y, p)`` set, with AUC and n in the legend."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    for name, (y_raw, p_raw) in curves.items():
        y = as_labels(y_raw)
        p = as_probabilities(p_raw, y.size)
        if not has_both_classes(y):
            ax.plot([], [], label=f"{name} (single class, n={y.size}: no curve)")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        auc = float(sklearn_auc(fpr, tpr))
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f}, n={y.size})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pr(
    curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
    path: PathLike,
    title: str = "Precision-recall curve (malignant)",
) -> Path:
    """Precision-recall curves with average precision; dashed lines mark each prevalence."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (y_raw, p_raw) in curves.items():
        y = as_labels(y_raw)
        p = as_probabilities(p_raw, y.size)
        if not has_both_classes(y):
            ax.plot([], [], label=f"{name} (single class, n={y.size}: no curve)")
            continue
        precision, recall, _ = precision_recall_curve(y, p)
        ap = float(average_precision_score(y, p))
        (line,) = ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {ap:.3f})")
        ax.axhline(float(y.mean()), linestyle="--", linewidth=0.8, color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(cm: Mapping[str, int], path: PathLike, title: str = "Confusion matrix") -> Path:
    """2x2 confusion matrix (rows: true class, columns: predicted) with counts and row %."""
    matrix = np.array(
        [[cm.get("tn", 0), cm.get("fp", 0)], [cm.get("fn", 0), cm.get("tp", 0)]], dtype=float
    )
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig = _figure(4.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            colour = "white" if share[i, j] > 0.6 else "black"
            text = f"{int(matrix[i, j])}\n({share[i, j]:.0%})"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=12)
    ax.set_xticks([0, 1], labels=["benign", "malignant"])
    ax.set_yticks([0, 1], labels=["benign", "malignant"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_reliability(
    y: npt.ArrayLike,
    p_before: npt.ArrayLike,
    p_after: npt.ArrayLike | None,
    path: PathLike,
    n_bins: int = 15,
) -> Path:
    """Reliability diagram before/after temperature scaling, with ECE and a count histogram."""
    labels = as_labels(y)
    fig = _figure(6.0, 6.5)
    ax = fig.add_axes((0.12, 0.35, 0.83, 0.6))
    hist = fig.add_axes((0.12, 0.08, 0.83, 0.18), sharex=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    width = 1.0 / n_bins
    sets = [("before scaling", p_before)]
    if p_after is not None:
        sets.append(("after scaling", p_after))
    for k, (name, p_raw) in enumerate(sets):
        p = as_probabilities(p_raw, labels.size)
        _, observed, predicted, counts = reliability_curve(labels, p, n_bins)
        ece = expected_calibration_error(labels, p, n_bins)
        filled = counts > 0
        ax.plot(predicted[filled], observed[filled], marker="o", label=f"{name} (ECE {ece:.3f})")
        edges = np.arange(n_bins) * width
        hist.bar(edges + k * width / 2, counts, width=width / 2, align="edge", alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), title="Reliability (malignant probability)")
    ax.set_ylabel("observed malignant fraction")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("count")
    hist.set_yscale("symlog")
    return _save(fig, path)


def plot_training_curves(history: Mapping[str, Sequence[float]], path: PathLike) -> Path:
    """Loss and AUC per epoch from a Keras-style history; missing keys are skipped."""
    panels = {
        "loss": sorted(k for k in history if "loss" in k.lower()),
        "AUC": sorted(k for k in history if "auc" in k.lower()),
    }
    panels = {name: keys for name, keys in panels.items() if keys}
    fig = _figure(6.0 * max(len(panels), 1), 4.0)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training history recorded", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    for i, (name, keys) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for key in keys:
            values = np.asarray(list(history[key]), dtype=float)
            if values.size:
                ax.plot(np.arange(1, values.size + 1), values, marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)
