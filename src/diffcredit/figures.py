"""Figures: sorted contributor values with interval whiskers (sample grids: :func:`diffcredit.sampling.save_grid`)."""

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
