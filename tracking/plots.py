"""PNG plots for runs and reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(history: dict[str, Sequence[float]], fine_tune_start: int | None, path: Path,
                    first_epoch: int = 0) -> Path:
    """Accuracy and loss per epoch for training and validation, fine-tuning start marked."""
    fig, axes = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for key, label in ((metric, "training"), (f"val_{metric}", "validation")):
            values = history.get(key, [])
            ax.plot(range(first_epoch + 1, first_epoch + len(values) + 1), values, marker="o", label=label)
        if fine_tune_start is not None:
            ax.axvline(fine_tune_start + 0.5, color="gray", linestyle="--", label="start fine-tuning")
        ax.set_ylabel(metric)
        ax.legend(loc="best")
    axes[0].set_title("Training and validation")
    axes[1].set_xlabel("epoch")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "Test split") -> Path:
    """Counts per (true, predicted) class."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    limit = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color="white" if matrix[i, j] > limit else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
