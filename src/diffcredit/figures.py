"""Figures: contributor values with interval whiskers, and their convergence over the coalitions used
(sample grids: :func:`diffcredit.sampling.save_grid`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

_PANELS = 8  # contributors shown in the convergence figure: the top and bottom few when there are more


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def plot_values(table: pd.DataFrame, path: str | Path, *, title: str, confidence: float, name: str) -> None:
    """Horizontal bars of `value` per `contributor`, highest on top, with [ci_low, ci_high] whiskers; `name` says what
    the values are (Shapley, Banzhaf, leave-one-out)."""
    plt = pyplot()
    table = table.sort_values("value")
    height = max(2.5, 0.28 * len(table) + 1.2)
    fig, ax = plt.subplots(figsize=(6.4, min(height, 40)))
    y = np.arange(len(table))
    errors = np.vstack([table["value"] - table["ci_low"], table["ci_high"] - table["value"]])
    ax.barh(y, table["value"], color="#4878a8", height=0.7)
    ax.errorbar(table["value"], y, xerr=errors, fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set_yticks(y, table["contributor"], fontsize=8 if len(table) > 30 else 10)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"{name} value ({confidence:.0%} interval)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(
    convergence: pd.DataFrame, rounds: pd.DataFrame, path: str | Path, *, title: str, confidence: float, name: str
) -> None:
    """One panel per contributor: value and a ±z·stderr band against the coalitions used (`convergence`), and each
    round's value with its interval at the round's end (`rounds`), dashed lines marking the rounds.

    With more than eight contributors only the four highest and the four lowest final values are shown.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    final = rounds[rounds["round"] == rounds["round"].max()].sort_values("value", ascending=False)
    shown = list(final["contributor"])
    if len(shown) > _PANELS:
        shown = shown[: _PANELS // 2] + shown[-_PANELS // 2 :]
    columns = min(len(shown), 4)
    lines = -(-len(shown) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.4 * lines + 0.6), sharex=True, squeeze=False)
    z = norm.ppf(0.5 + confidence / 2)
    ends = sorted(rounds["n_coalitions"].unique())
    for ax, contributor in zip(axes.flat, shown, strict=True):
        path_of = convergence[convergence["contributor"] == contributor].sort_values("n_coalitions")
        x, value, band = path_of["n_coalitions"], path_of["value"], z * path_of["stderr"].fillna(0)
        ax.fill_between(x, value - band, value + band, color="#4878a8", alpha=0.25, linewidth=0)
        ax.plot(x, value, color="#4878a8", linewidth=1.2)
        at_ends = rounds[rounds["contributor"] == contributor]
        ax.errorbar(
            at_ends["n_coalitions"],
            at_ends["value"],
            fmt="o",
            color="black",
            markersize=3,
            capsize=3,
            yerr=np.vstack([at_ends["value"] - at_ends["ci_low"], at_ends["ci_high"] - at_ends["value"]]),
            linewidth=1,
        )
        for end in ends:
            ax.axvline(end, color="grey", linestyle="--", linewidth=0.7)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(contributor, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("coalitions used", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{name} value", fontsize=8)
    fig.suptitle(
        f"{title}\nband: ±{z:.2f}·stderr; points: {confidence:.0%} interval at the end of each of "
        f"{len(ends)} round(s) (dashed)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
