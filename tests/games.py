"""Small cooperative games with known values, and plain-Python reference values to test the estimators against."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diffcredit.coalitions import member_sets, plan


@dataclass(frozen=True)
class Game:
    """v(S) = offset + Σ_{i∈S} a_i + Σ_{i<j∈S} B_ij + bonus·[Σ_{i∈S} w_i ≥ quota] over players p0, p1, …"""

    a: np.ndarray
    pairs: np.ndarray  # strictly upper triangular
    weights: np.ndarray | None = None
    quota: float = 0.0
    bonus: float = 0.0
    offset: float = 0.0

    @property
    def players(self) -> list[str]:
        return [f"p{i}" for i in range(len(self.a))]

    def __call__(self, members: Sequence[str]) -> float:
        index = [self.players.index(m) for m in members]
        value = self.offset + self.a[index].sum() + self.pairs[np.ix_(index, index)].sum()
        if self.weights is not None and self.weights[index].sum() >= self.quota:
            value += self.bonus
        return float(value)


def additive(a: Sequence[float], offset: float = 0.0) -> Game:
    a = np.asarray(a, float)
    return Game(a, np.zeros((len(a), len(a))), offset=offset)


def pairwise(n: int, seed: int, offset: float = 2.0) -> Game:
    """Additive terms and pairwise interactions: Shapley and Banzhaf value a_i + Σ_j B_ij / 2."""
    rng = np.random.default_rng(seed)
    return Game(rng.normal(size=n), np.triu(rng.normal(size=(n, n)), 1), offset=offset)


def majority(weights: Sequence[float], quota: float) -> Game:
    """Weighted majority game: v(S) = 1 when the weights of S reach the quota."""
    weights = np.asarray(weights, float)
    n = len(weights)
    return Game(np.zeros(n), np.zeros((n, n)), weights=weights, quota=quota, bonus=1.0)


def reference_shapley(game: Callable[[Sequence[str]], float], players: Sequence[str]) -> np.ndarray:
    """Shapley values by the textbook sum over subsets, one player at a time (slow, independent of the package)."""
    n = len(players)
    values = []
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                total += weight * (game([*subset, player]) - game(subset))
        values.append(total)
    return np.array(values)


def reference_banzhaf(game: Callable[[Sequence[str]], float], players: Sequence[str]) -> np.ndarray:
    """Banzhaf values: the mean marginal contribution over all subsets of the other players."""
    values = []
    for player in players:
        others = [p for p in players if p != player]
        subsets = [s for size in range(len(others) + 1) for s in itertools.combinations(others, size)]
        values.append(np.mean([game([*s, player]) - game(s) for s in subsets]))
    return np.array(values)


def concave(weights: Sequence[float], scale: float = 3.0) -> Callable[[Sequence[str]], float]:
    """v(S) = scale·sqrt(Σ_{i∈S} w_i): diminishing returns, every order of interaction present."""
    weights = np.asarray(weights, float)

    def game(members: Sequence[str]) -> float:
        return float(scale * np.sqrt(sum(weights[int(m[1:])] for m in members)))

    return game


def utilities(
    table: pd.DataFrame,
    game: Callable[[Sequence[str]], float],
    *,
    seeds: int | None = None,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Utility rows for every planned coalition with Gaussian noise of sd ``noise``: ``seeds`` rows each, or as many
    as the plan's ``repeats`` column asks for (1 where it has none)."""
    rng = rng or np.random.default_rng(0)
    if seeds is not None:
        repeats = np.full(len(table), seeds)
    else:
        repeats = table["repeats"].astype(int).to_numpy() if "repeats" in table else np.ones(len(table), int)
    rows = [
        (coalition, seed, game(members) + noise * rng.normal())
        for (coalition, members), k in zip(member_sets(table).items(), repeats, strict=True)
        for seed in range(k)
    ]
    return pd.DataFrame(rows, columns=["coalition", "seed", "utility"])


def planned(game: Game, estimator: str, budget: int | None, seed: int = 0) -> pd.DataFrame:
    return plan(game.players, estimator, budget, seed)
