"""Benchmark of the Shapley estimators on synthetic games with known values: error against budget and coverage.

Run: ``.venv/bin/python benchmarks/bench_estimators.py`` (add ``--shapiq /work/venvs/shapiq/bin/python`` for
shapiq's approximators, an optional benchmark extra: ``pip install shapiq==1.4.1`` in a separate environment). Every
(game, n, noise, estimator, budget) cell is stored in ``results/bench_estimators/cells.json`` as it finishes, so an
interrupted run resumes. Writes the section "## Estimators on synthetic games" of benchmarks/RESULTS.md.

Games (n = 10, 20, 50): additive, pairwise (additive + pairwise interactions), weighted majority (integer weights,
quota half the total) and concave (3·sqrt of an integer-weighted sum); each without and with Gaussian seed noise of
sd 7% of the range of the true values. True values: closed form (additive, pairwise) or a dynamic programme over
(size, weight) (majority, concave: v(S) = g(w(S))). Error: ‖φ̂ − φ‖₂/‖φ‖₂, mean over seeds; coverage: share of 95%
intervals holding the true value. ``paper`` is the authors' closed form written from its formula (sizes from the
Shapley kernel, uniform subsets, no pairing, sampled matrix); ``shapiq`` is shapiq 1.4.1's KernelSHAP with its
defaults, the peer the default is measured against. The field's sampling estimators run beside them from shapiq,
each with its defaults: ``shapiq_svarm`` (stratified SVARM, Kolpaczki et al. 2024: every coalition updates every
player's size stratum, no marginal contributions), ``shapiq_stratified`` (Maleki et al. 2013: marginal
contributions stratified by coalition size) and ``shapiq_permutation`` (plain permutation sampling). Each is given
the same number of coalitions (``budget``, the ∅ and N included; an estimator that evaluates a coalition twice pays
twice). After a change to an estimator, ``--refresh kernelshap,permutation`` measures those estimators' cells again
and keeps the others.

The shapiq worker (``--worker``) is this file run by the other environment; it imports numpy and shapiq only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "results" / "bench_estimators" / "cells.json"
OURS = ("kernelshap", "kernelshap_leverage", "kernelshap_unpaired", "kernelshap_unbiased", "permutation")
SIZES = {10: (32, 64, 128, 256, 512), 20: (64, 128, 256, 512, 1024, 2048), 50: (128, 256, 512, 1024, 2048, 4096)}
GAMES = ("additive", "pairwise", "majority", "concave")
SEEDS = 12
# shapiq 1.4.1's approximators, by the column each fills; "shapiq" (KernelSHAP) is the peer of the issue's target
SHAPIQ = {
    "shapiq": "KernelSHAP",
    "shapiq_svarm": "SVARM",
    "shapiq_stratified": "StratifiedSamplingSV",
    "shapiq_permutation": "PermutationSamplingSV",
}
SAMPLING = tuple(column for column in SHAPIQ if column != "shapiq")  # the field's sampling estimators, from shapiq
NOISE = 0.07  # seed-noise sd as a share of the range of the true values
TITLE = "Estimators on synthetic games"


# ---- games (numpy only: the shapiq worker uses them too) ----


def make_game(kind: str, n: int):
    """Return (value of each row of a 0-1 membership matrix, true Shapley values)."""
    rng = np.random.default_rng(n * 100 + GAMES.index(kind))
    if kind in ("additive", "pairwise"):
        a = rng.normal(size=n)
        b = np.triu(rng.normal(size=(n, n)), 1) * (kind == "pairwise") * 2 / math.sqrt(n)
        return (lambda z: z @ a + ((z @ b) * z).sum(axis=1)), a + (b + b.T).sum(axis=1) / 2
    w = rng.integers(1, 6, size=n)
    if kind == "majority":
        quota = w.sum() / 2
        g = lambda total: (total >= quota).astype(float)  # noqa: E731
    else:
        g = lambda total: 3.0 * np.sqrt(total)  # noqa: E731
    return (lambda z: g(z @ w)), _weighted_shapley(w, g)


def _weighted_shapley(w: np.ndarray, g) -> np.ndarray:
    """Shapley values of v(S) = g(w(S)) by counting subsets of the others by (size, weight)."""
    n, top = len(w), int(w.sum())
    values = np.zeros(n)
    weights = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
    totals = np.arange(top + 1)
    for i in range(n):
        count = np.zeros((n, top + 1))
        count[0, 0] = 1
        for j in np.delete(np.arange(n), i):
            count[1:, w[j] :] += count[:-1, : top + 1 - w[j]].copy()
        gain = g(np.minimum(totals + w[i], top).astype(float)) - g(totals.astype(float))
        values[i] = (weights[:, None] * count * gain[None, :]).sum()
    return values


def noisy(game, sd: float, rng: np.random.Generator):
    """``game`` with fresh seed noise on every evaluation; one coalition (a vector, as shapiq's samplers pass ∅) gives
    an array of one value."""

    def measured(z: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(z)
        return game(z) + sd * rng.normal(size=len(z))

    return measured


def paper_estimate(n: int, budget: int, game, seed: int) -> np.ndarray:
    """The authors' estimator from its formula: M = budget − 2 unpaired draws, sampled Â and b̂, constrained."""
    rng = np.random.default_rng(seed)
    sizes = np.arange(1, n)
    p = 1 / (sizes * (n - sizes))
    drawn = rng.choice(sizes, size=budget - 2, p=p / p.sum())
    z = (np.argsort(rng.random((budget - 2, n)), axis=1) < drawn[:, None]).astype(float)
    bounds = game(np.array([np.zeros(n), np.ones(n)]))
    v0, delta = bounds[0], bounds[1] - bounds[0]
    a_hat = z.T @ z / len(z)
    b_hat = z.T @ (game(z) - v0) / len(z)
    inverse = np.linalg.pinv(a_hat)
    ones = inverse.sum(axis=1)
    return inverse @ b_hat - ones * (ones @ b_hat - delta) / ones.sum()


def worker() -> None:
    """Read cells (JSON lines on stdin, each naming its shapiq approximator); answer their estimates, a line each."""
    import shapiq

    for line in sys.stdin:
        cell = json.loads(line)
        game, truth = make_game(cell["game"], cell["n"])
        sd = NOISE * np.ptp(truth) * cell["noisy"]
        estimates = []
        for seed in range(cell["seeds"]):
            rng = np.random.default_rng(seed + 7)
            approximator = getattr(shapiq, cell["approximator"])(cell["n"], random_state=seed)
            values = approximator.approximate(budget=cell["budget"], game=noisy(game, sd, rng))
            estimates.append(values.get_n_order_values(1).tolist())
        print(json.dumps(estimates), flush=True)


# ---- the measurement ----


def ours(estimator: str, n: int, budget: int, game, truth: np.ndarray, sd: float, seeds: int) -> dict:
    import pandas as pd

    from diffcredit.coalitions import parse_coalitions, plan
    from diffcredit.shapley import aggregate

    players = [f"p{i}" for i in range(n)]
    errors, covered, seconds = [], [], 0.0
    for seed in range(seeds):
        table = plan(players, estimator, budget, seed)
        z = parse_coalitions(table, players)[2].toarray().astype(float)
        times = table["repeats"].to_numpy(int)
        rng = np.random.default_rng(seed + 7)
        utility = np.repeat(game(z), times) + sd * rng.normal(size=times.sum())
        rows = pd.DataFrame({"coalition": np.repeat(table["coalition"].to_numpy(), times), "utility": utility})
        start = time.perf_counter()
        try:
            result = aggregate(table, rows, contributors=players, convergence=False)
        except ValueError:  # e.g. fewer than two permutation draws fit in the budget
            return {"error": math.nan, "coverage": math.nan, "seconds": math.nan}
        seconds += time.perf_counter() - start
        errors.append(np.linalg.norm(result.values - truth) / np.linalg.norm(truth))
        slack = 1e-9 * np.abs(truth).max()  # an exact estimate with a zero-width interval covers
        covered.append(np.mean((result.ci_low - slack <= truth) & (truth <= result.ci_high + slack)))
    return {"error": float(np.mean(errors)), "coverage": float(np.mean(covered)), "seconds": seconds / seeds}


def cells(games: list[str], sizes: list[int]) -> list[dict]:
    return [
        {"game": g, "n": n, "noisy": noisy_, "budget": b, "seeds": SEEDS}
        for n in sizes
        for g in games
        for noisy_ in (0, 1)
        for b in SIZES[n]
    ]


def key(cell: dict, estimator: str) -> str:
    return f"{cell['game']}/n{cell['n']}/{'noisy' if cell['noisy'] else 'exact'}/{estimator}/{cell['budget']}"


def measure(todo: list[dict], shapiq: str | None, refresh: tuple[str, ...] = ()) -> dict:
    """Measure the cells not in the store yet; ``refresh`` names estimators whose stored cells are measured again."""
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    for cell in todo:
        for estimator in refresh:
            store.pop(key(cell, estimator), None)
    STORE.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = STORE.with_suffix(".tmp")
        tmp.write_text(json.dumps(store, indent=0, sort_keys=True))
        tmp.replace(STORE)

    for cell in todo:
        game, truth = make_game(cell["game"], cell["n"])
        sd = NOISE * np.ptp(truth) * cell["noisy"]
        for estimator in OURS:
            if key(cell, estimator) not in store:
                store[key(cell, estimator)] = ours(estimator, cell["n"], cell["budget"], game, truth, sd, SEEDS)
                print(key(cell, estimator), store[key(cell, estimator)], flush=True)
        if key(cell, "paper") not in store:
            errors = []
            for seed in range(SEEDS):
                rng = np.random.default_rng(seed + 7)
                estimate = paper_estimate(cell["n"], cell["budget"], noisy(game, sd, rng), seed)
                errors.append(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))
            store[key(cell, "paper")] = {"error": float(np.mean(errors))}
        save()
    if shapiq:
        missing = [
            {**c, "column": col, "approximator": a}
            for col, a in SHAPIQ.items()
            for c in todo
            if key(c, col) not in store
        ]
        if missing:
            process = subprocess.run(
                [shapiq, __file__, "--worker"],
                input="\n".join(map(json.dumps, missing)),
                capture_output=True,
                text=True,
                check=True,
            )
            for cell, line in zip(missing, process.stdout.splitlines(), strict=True):
                _, truth = make_game(cell["game"], cell["n"])
                errors = [np.linalg.norm(np.array(e) - truth) / np.linalg.norm(truth) for e in json.loads(line)]
                store[key(cell, cell["column"])] = {"error": float(np.mean(errors))}
            save()
    return store


def report(store: dict, todo: list[dict], shapiq_version: str | None) -> str:
    from machine import machine_description

    estimators = [*OURS, "paper"] + (list(SHAPIQ) if shapiq_version else [])
    lines = [
        f"`.venv/bin/python benchmarks/bench_estimators.py --shapiq /work/venvs/shapiq/bin/python` on "
        f"{datetime.date.today().isoformat()}, {machine_description()}; shapiq {shapiq_version or 'not run'}; "
        f"{SEEDS} seeds per cell; noise sd {NOISE:.0%} of the range of the true values; error = mean "
        "‖φ̂ − φ‖₂/‖φ‖₂. Coalitions counted as distinct utility evaluations (∅ and N included, their repeats not).",
        "",
        "Mean relative error by budget (the default `kernelshap` first; **bold**: lowest in the row; `shapiq` is "
        "shapiq's KernelSHAP, `shapiq_svarm`, `shapiq_stratified` and `shapiq_permutation` are shapiq's stratified "
        "SVARM, Maleki's stratified sampling and plain permutation sampling; the last column is the default's error "
        "over the better of shapiq's KernelSHAP and the paper's formula):",
        "",
    ]
    groups = sorted({(c["n"], c["game"], c["noisy"]) for c in todo}, key=lambda g: (g[0], GAMES.index(g[1]), g[2]))
    lines += [
        "| n | game | noise | budget | " + " | ".join(estimators) + " | ratio |",
        "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in estimators) + " | ---: |",
    ]
    ratios, unpaired, sampling = [], {}, {}  # the default's ratio per cell; kernelshap_unpaired's and the
    # best of shapiq's sampling estimators over the default, per game
    for n, game, noisy_ in groups:
        for budget in SIZES[n]:
            cell = {"game": game, "n": n, "noisy": noisy_, "budget": budget}
            errors = [store.get(key(cell, e), {}).get("error", math.nan) for e in estimators]
            best = np.nanmin(errors)
            peers = [errors[estimators.index(p)] for p in ("paper", "shapiq") if p in estimators]
            floor = np.nanmin(peers)
            ratio = 1.0 if max(errors[0], floor) < 1e-9 else errors[0] / floor if floor > 0 else math.inf
            ratios.append(ratio)
            own = errors[estimators.index("kernelshap_unpaired")]
            unpaired.setdefault(game, []).append(1.0 if max(own, floor) < 1e-9 else own / floor)
            others = [errors[estimators.index(e)] for e in SAMPLING if e in estimators]
            if others and errors[0] > 1e-9:  # where the default is exact, so are they or they lose
                sampling.setdefault(game, []).append(np.nanmin(others) / errors[0])
            shown = [f"**{e:.3g}**" if e == best else f"{e:.3g}" for e in errors]
            lines.append(
                f"| {n} | {game} | {'yes' if noisy_ else 'no'} | {budget} | " + " | ".join(shown) + f" | {ratio:.2f} |"
            )
    lines += [
        "",
        "Coalitions needed for 10% relative error (smallest budget of the grid; `>` = not reached) "
        "and mean 95% coverage over all budgets (ours only):",
        "",
        "| n | game | noise | " + " | ".join(estimators) + " | coverage " + " / ".join(OURS) + " |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in estimators) + " | --- |",
    ]
    for n, game, noisy_ in groups:
        needed, cover = [], []
        for e in estimators:
            reached = [
                b
                for b in SIZES[n]
                if store.get(key({"game": game, "n": n, "noisy": noisy_, "budget": b}, e), {}).get("error", math.inf)
                <= 0.1
            ]
            needed.append(str(reached[0]) if reached else f">{SIZES[n][-1]}")
        for e in OURS:
            cover.append(
                np.nanmean(
                    [
                        store.get(key({"game": game, "n": n, "noisy": noisy_, "budget": b}, e), {}).get(
                            "coverage", math.nan
                        )
                        for b in SIZES[n]
                    ]
                )
            )
        lines.append(
            f"| {n} | {game} | {'yes' if noisy_ else 'no'} | "
            + " | ".join(needed)
            + " | "
            + " / ".join(f"{c:.3f}" for c in cover)
            + " |"
        )
    ratios = np.array(ratios)
    ratios = ratios[~np.isnan(ratios)]
    lines += [
        "",
        f"Default over the best peer: median ratio {np.median(ratios):.2f}, worst {ratios.max():.2f}, "
        f"≤ 1 in {np.mean(ratios <= 1):.0%} and ≤ 0.5 in {np.mean(ratios <= 0.5):.0%} of "
        f"{len(ratios)} cells (cells where both are exact count as 1).",
        "",
        "`kernelshap_unpaired` over the best peer, by game: "
        + "; ".join(
            f"{game} median {np.nanmedian(r):.2f}, worst {np.nanmax(r):.2f}"
            for game, r in sorted(unpaired.items(), key=lambda item: GAMES.index(item[0]))
        )
        + ".",
    ]
    if sampling:
        lines += [
            "",
            f"The best of shapiq's sampling estimators ({', '.join(SAMPLING)}) over the default, by game, in the "
            "cells where the default is not exact: "
            + "; ".join(
                f"{game} median {np.median(r):.2f}, best {np.min(r):.2f}, below 1 in {np.sum(np.array(r) < 1)} of "
                f"{len(r)}"
                for game, r in sorted(sampling.items(), key=lambda item: GAMES.index(item[0]))
            )
            + " (below 1: that estimator is the more accurate).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shapiq", help="python of an environment with shapiq==1.4.1")
    parser.add_argument("--sizes", default="10,20,50", help="numbers of players")
    parser.add_argument("--games", default=",".join(GAMES))
    parser.add_argument(
        "--refresh", default="", help="comma-separated estimators to measure again (their stored cells are dropped)"
    )
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import replace_section

    todo = cells(args.games.split(","), [int(s) for s in args.sizes.split(",")])
    refresh = tuple(filter(None, args.refresh.split(",")))
    known = [*OURS, "paper", *SHAPIQ]
    unknown = set(refresh) - set(known)
    if unknown:
        parser.error(f"--refresh: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    store = measure(todo, args.shapiq, refresh)
    version = None
    if args.shapiq:
        version = subprocess.run(
            [args.shapiq, "-c", "from importlib.metadata import version; print(version('shapiq'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    text = report(store, todo, version)
    print(text)
    replace_section(ROOT / "benchmarks" / "RESULTS.md", TITLE, text)


if __name__ == "__main__":
    main()
