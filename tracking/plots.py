"""PNG plots for runs and reports (matplotlib, no display needed).

Figures are made with matplotlib's object API, not pyplot, so they can be drawn on a background
thread (see ``tracking.journal``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from tracking.layout import CONFUSION_MATRIX, LEARNING_CURVES, PREDICTIONS

FAST_PNG = {"compress_level": 1}  # a little larger, several times faster to write than the default 6


def learning_curves(history: dict[str, Sequence[float]], fine_tune_start: int | None, path: Path,
                    first_epoch: int = 0) -> Path:
    """Accuracy and loss per epoch for training and validation, fine-tuning start marked."""
    fig = Figure(figsize=(7, 7))
    axes = fig.subplots(2, 1, sharex=True)
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
    fig.subplots_adjust(left=0.11, right=0.97, top=0.94, bottom=0.08, hspace=0.08)  # fixed: no layout pass
    fig.savefig(path, dpi=80, pil_kwargs=FAST_PNG)
    return path


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "Test split") -> Path:
    """Counts per (true, predicted) class."""
    n = len(class_names)
    fig = Figure(figsize=(1.2 * n + 3, 1.2 * n + 2))
    ax = fig.subplots()
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
    fig.savefig(path, dpi=80, pil_kwargs=FAST_PNG)
    return path


def prediction_grid(images: np.ndarray, labels: Sequence[int], predicted: Sequence[int], class_names: Sequence[str],
                    path: Path, columns: int = 4) -> Path:
    """Test images titled with the predicted class: blue when right, red with the true class in brackets when wrong.

    Drawn as one mosaic image with text on it (one axes, not one per image: several times faster).
    """
    n, size = len(images), int(images.shape[1]) if len(images) else 1
    rows = max(1, -(-n // columns))
    pad = max(size // 4, 18)  # room for each title above its image
    mosaic = np.full((rows * (size + pad), columns * size + (columns - 1) * 4, 3), 255, np.uint8)
    fig = Figure(figsize=(columns * 2.0, rows * 2.0 * (size + pad) / size + 0.3))
    ax = fig.add_axes((0, 0, 1, 0.94))
    for i, (image, (title, colour)) in enumerate(zip(images, grid_titles(labels, predicted, class_names))):
        r, c = divmod(i, columns)
        top, left = r * (size + pad) + pad, c * (size + 4)
        mosaic[top : top + size, left : left + size] = np.clip(image, 0, 255).astype(np.uint8)
        ax.text(left + size / 2, top - 3, title, color=colour, fontsize=9, ha="center", va="bottom")
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    fig.suptitle("Predictions on test images (red: wrong, true class in brackets)", fontsize=10)
    fig.savefig(path, dpi=72, pil_kwargs=FAST_PNG)
    return path


def grid_titles(labels: Sequence[int], predicted: Sequence[int], class_names: Sequence[str]) -> list[tuple[str, str]]:
    """``(title, colour)`` per image: the predicted class in blue, or in red with the true class in brackets."""
    return [(class_names[int(p)], "blue") if int(t) == int(p) else (f"{class_names[int(p)]} ({class_names[int(t)]})", "red")
            for t, p in zip(labels, predicted)]


def by_backbone(values: dict[str, Sequence[float]], path: Path, objective: str = "val_accuracy") -> Path:
    """Each finished trial's objective, one column per backbone, best marked."""
    names = sorted(values, key=lambda k: -max(values[k]))
    fig = Figure(figsize=(1.6 * len(names) + 3, 4))
    ax = fig.subplots()
    for i, name in enumerate(names):
        ys = list(values[name])
        xs = i + np.linspace(-0.12, 0.12, len(ys)) if len(ys) > 1 else [i]
        ax.scatter(xs, ys, alpha=0.75)
        ax.plot([i - 0.25, i + 0.25], [max(ys)] * 2, color="black")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} by backbone (bar: best trial)")
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs=FAST_PNG)
    return path


MISSING = "n/a"  # a hyperparameter a trial did not have (e.g. fine_tune_at of a head-only trial)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value) in ("None", "nan", "", "-")


def _axis(raw: list, label: Callable[[float], str] | None = None) -> tuple[np.ndarray, tuple[list[float], list[str]]]:
    """One parallel-coordinates axis: positions in [0, 1] and its ticks. Numbers are placed by value (log scale
    when they span more than a factor 50), other values by category; a value shared by every trial (tied
    scores) is one tick in the middle, and missing values get their own tick, ``n/a``, below the others."""
    present = [v for v in raw if not _is_missing(v)]
    try:
        nums = np.asarray([float(v) for v in present])
        numeric = len(nums) > 0
    except (TypeError, ValueError):
        numeric = False
    has_missing = len(present) < len(raw)
    top = 1.0
    bottom = 0.15 if has_missing else 0.0  # n/a sits at 0
    if numeric:
        log = (nums > 0).all() and nums.max() / nums.min() > 50
        shown = label or ((lambda v: f"{10 ** v:.2g}") if log else (lambda v: f"{v:.3g}"))
        values = np.log10(nums) if log else nums
        lo, hi = values.min(), values.max()
        place = (lambda v: bottom + (top - bottom) * (v - lo) / (hi - lo)) if hi > lo else (lambda v: (bottom + top) / 2)
        positions = iter([place(v) for v in values])
        ticks = ([place(lo), place(hi)], [shown(lo), shown(hi)]) if hi > lo else ([place(lo)], [shown(lo)])
    else:
        categories = sorted({str(v) for v in present})
        span = len(categories) - 1
        pos = {c: (bottom + (top - bottom) * i / span if span else (bottom + top) / 2) for i, c in enumerate(categories)}
        positions = iter([pos[str(v)] for v in present])
        ticks = (list(pos.values()), list(pos))
    scaled = np.asarray([0.0 if _is_missing(v) else next(positions) for v in raw])
    if has_missing:
        ticks = ([0.0, *ticks[0]], [MISSING, *ticks[1]])
    return scaled, ticks


def parallel_coordinates(columns: dict[str, Sequence[object]], objective: Sequence[float], path: Path,
                         objective_name: str = "val_accuracy") -> Path:
    """One line per trial across its hyperparameters (each axis scaled to its range), coloured by the objective.

    Numeric columns are placed by value (log scale when they span more than a factor 50); others by category.
    """
    import matplotlib

    axes_values: list[np.ndarray] = []
    ticks: list[tuple[list[float], list[str]]] = []
    for raw in columns.values():
        scaled, axis_ticks = _axis(list(raw))
        axes_values.append(scaled)
        ticks.append(axis_ticks)
    names = [*columns, objective_name]
    obj = np.asarray(objective, dtype=float)
    lo, hi = np.nanmin(obj), np.nanmax(obj)
    scaled, axis_ticks = _axis(list(obj), label=lambda v: f"{v:.3f}")
    axes_values.append(scaled)
    ticks.append(axis_ticks)
    fig = Figure(figsize=(1.5 * len(names) + 2, 4.5))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    order = np.argsort(obj)  # best drawn last, on top
    for i in order:
        colour = cmap(0.5 if hi == lo else (obj[i] - lo) / (hi - lo))
        ax.plot(range(len(names)), [a[i] for a in axes_values], color=colour, alpha=0.8)
    for x, (positions, labels) in enumerate(ticks):
        ax.axvline(x, color="gray", linewidth=0.8)
        for y, text in zip(positions, labels):
            ax.text(x + 0.03, y, text, fontsize=7, va="center")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_title(f"Hyperparameters against {objective_name} (yellow: best)")
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs=FAST_PNG)
    return path


def pareto(costs: Sequence[float], values: Sequence[float], labels: Sequence[str], front: Sequence[int], path: Path,
           cost_name: str = "latency_ms", objective: str = "val_accuracy") -> Path:
    """Each finished trial's objective against one cost; the Pareto front (no other trial is both cheaper and
    better) joined by a line and labelled with its trials."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.scatter(costs, values, color="lightgray", edgecolor="gray", label="trials")
    fx, fy = [costs[i] for i in front], [values[i] for i in front]
    ax.step(fx, fy, where="post", color="tab:blue")
    ax.scatter(fx, fy, color="tab:blue", zorder=3, label="Pareto front")
    for i in front:
        ax.annotate(str(labels[i]), (costs[i], values[i]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel(cost_name + " (lower is better)")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} against {cost_name}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs=FAST_PNG)
    return path


def trial_plots(data: dict, folder: str | Path) -> list[Path]:
    """A trial's learning curves and, if given, confusion matrix and prediction grid, as PNG files in ``folder``."""
    folder = Path(folder)
    drawn = [learning_curves(data["history"], data.get("fine_tune_start"), folder / LEARNING_CURVES,
                             first_epoch=int(data.get("first_epoch", 0)))]
    if data.get("confusion") is not None:
        drawn.append(confusion_matrix(np.asarray(data["confusion"]), data["class_names"], folder / CONFUSION_MATRIX))
    if data.get("grid_images") is not None and len(data["grid_images"]):
        drawn.append(prediction_grid(np.asarray(data["grid_images"]), data["grid_labels"], data["grid_predicted"],
                                     data["class_names"], folder / PREDICTIONS))
    return drawn
