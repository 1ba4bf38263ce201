"""Figures: sorted contributor values with interval whiskers, and panels of sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def plot_values(table: pd.DataFrame, path: str | Path, *, title: str, confidence: float) -> None:
    """Horizontal bars of `value` per `contributor`, highest on top, with [ci_low, ci_high] whiskers."""
    plt = _pyplot()
    table = table.sort_values("value")
    height = max(2.5, 0.28 * len(table) + 1.2)
    fig, ax = plt.subplots(figsize=(6.4, min(height, 40)))
    y = np.arange(len(table))
    errors = np.vstack([table["value"] - table["ci_low"], table["ci_high"] - table["value"]])
    ax.barh(y, table["value"], color="#4878a8", height=0.7)
    ax.errorbar(table["value"], y, xerr=errors, fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set_yticks(y, table["contributor"], fontsize=8 if len(table) > 30 else 10)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"Shapley value ({confidence:.0%} interval)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sample_panels(panels: dict[str, np.ndarray], path: str | Path, *, columns: int = 8) -> None:
    """One titled grid per entry of `panels` (label -> images [N, C, H, W] in [-1, 1]), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6), squeeze=False)
    for ax, (label, images) in zip(axes[0], panels.items()):
        ax.imshow(_grid(images, columns), cmap="gray" if images.shape[1] == 1 else None, vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid(images: np.ndarray, columns: int) -> np.ndarray:
    """Tile images [N, C, H, W] in [-1, 1] into one [rows*H, columns*W(, C)] array in [0, 1]."""
    images = np.clip((images + 1) / 2, 0, 1)
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 1), columns * (w + 1), c), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image.transpose(1, 2, 0)
    return canvas[..., 0] if c == 1 else canvas
