"""PNG figures: a vector, a bank of vectors, accuracy per class before/after, points lost per class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fv_serving.atomic import atomic_path


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _show_vector(ax: plt.Axes, delta: np.ndarray, title: str, limit: float) -> None:
    """Diverging colours centred on 0; colour images shown as their channel mean."""
    image = delta.mean(axis=0)
    im = ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_vector(delta: np.ndarray, path: str | Path, title: str) -> Path:
    limit = float(np.abs(delta).max()) or 1.0
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    _show_vector(ax, delta, f"{title}\n||delta||_2 = {np.linalg.norm(delta):.2f}", limit)
    return save_figure(fig, path)


def plot_bank(vectors: np.ndarray, names: Sequence[str], path: str | Path) -> Path:
    k = len(vectors)
    cols = min(k, 5)
    rows = (k + cols - 1) // cols
    limit = float(np.abs(vectors).max()) or 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[k:]:
        ax.axis("off")
    for ax, delta, name in zip(axes.flat, vectors, names, strict=False):
        _show_vector(ax, delta, name, limit)
    return save_figure(fig, path)


def _grouped_bars(ax: plt.Axes, series: Mapping[str, Sequence[float]]) -> np.ndarray:
    """One group of bars per position, one bar per series side by side; returns the groups' x positions."""
    x = np.arange(len(next(iter(series.values()), [])))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    return x


def plot_per_class(
    class_names: Sequence[str],
    series: Mapping[str, Sequence[float]],
    forgotten: Sequence[int],
    path: str | Path,
    title: str,
) -> Path:
    """Grouped bars of test accuracy per class, one bar per model; forgotten classes marked."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(class_names)), 3.6))
    x = _grouped_bars(ax, series)
    for c in forgotten:
        ax.axvspan(c - 0.45, c + 0.45, color="grey", alpha=0.15)
    ax.set_xticks(
        x,
        [f"{n}\n(forgotten)" if i in forgotten else n for i, n in enumerate(class_names)],
        fontsize=7,
        rotation=0,
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_drops_per_class(
    class_names: Sequence[str],
    series: Mapping[str, Sequence[float]],
    limit: float,
    path: str | Path,
    title: str,
) -> Path:
    """Grouped bars of accuracy points lost, one group per forgotten class, against an acceptance `limit` line."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(class_names)), 3.2))
    x = _grouped_bars(ax, series)
    ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"limit ({limit:g} point)")
    ax.set_xticks(x, list(class_names), fontsize=7)
    ax.set_xlabel("forgotten class")
    ax.set_ylabel("points lost")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
