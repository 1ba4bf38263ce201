"""The `evaluate` target's stages: counterfactual retraining, multi-fidelity values and the fidelity report against
retraining from scratch (LDS per alpha, the budget-matched comparison, every method's cost), with its figures.

Rule adapters like :mod:`diffcredit.stages`; the measures themselves (LDS, agreement, counterfactual tables) live in
:mod:`diffcredit.evaluation`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from diffcredit.contributors import ContributorData
from diffcredit.io import write_json, write_table
from diffcredit.stages import utility_settings
from diffcredit.utility import UtilityStore, evaluate_coalitions

# The counterfactual's rows besides the rankings: the full-data baseline and the seeded random control.
COUNTERFACTUAL_FULL, COUNTERFACTUAL_RANDOM = "full", "random"


def counterfactual_runs(
    *,
    ranking: str,
    values: str | None,
    train_data: str,
    reference: str,
    fraction: float,
    repeats: int,
    settings: dict,
    store: str,
    out: str,
    log=print,
) -> pd.DataFrame:
    """Retrain without the top `fraction` of one ranking's contributors, once per training seed: one job per ranking,
    so a cluster runs them side by side (the shared `store` measures each removal set once).

    `values` is the ranking's values table; `ranking` ``full`` (nothing removed) and ``random`` (a seeded random
    ranking) take none. Writes ``ranking``, ``repeat``, ``utility`` and ``removed`` rows.
    """
    from diffcredit.evaluation import counterfactual_removals, random_ranking

    data = ContributorData.load(train_data)
    everyone = data.contributor_ids
    if ranking == COUNTERFACTUAL_FULL:
        removed: tuple[str, ...] = ()
    else:
        scores = (
            random_ranking(everyone, seed=settings["seed"]) if ranking == COUNTERFACTUAL_RANDOM else _values(values)
        )
        removed = counterfactual_removals(scores, fraction)
    kept = [c for c in everyone if c not in removed]
    plan = pd.DataFrame({"coalition": [ranking], "members": [",".join(kept)]})
    measured = evaluate_coalitions(
        plan,
        repeats=repeats,
        data=data,
        settings=utility_settings(data, settings),
        start_model=None,
        store=UtilityStore(store),
        reference_dir=reference,
        log=log,
    )
    runs = measured[["repeat", "utility"]].assign(ranking=ranking, removed=",".join(removed))
    write_table(runs[["ranking", "repeat", "utility", "removed"]], out)
    return runs


def counterfactual(*, runs: list[str], out: str) -> pd.DataFrame:
    """The counterfactual table (:func:`diffcredit.evaluation.counterfactual_table`) from each ranking's
    :func:`counterfactual_runs`: the property after each removal against the full-data baseline, with the removed
    contributors."""
    from diffcredit.evaluation import counterfactual_table

    measured = pd.concat([pd.read_csv(path, sep="\t", dtype={"removed": str}) for path in runs])
    utilities = measured.pivot(index="ranking", columns="repeat", values="utility")
    names = [name for name in dict.fromkeys(measured["ranking"]) if name != COUNTERFACTUAL_FULL]
    table = counterfactual_table(
        utilities.loc[COUNTERFACTUAL_FULL].to_numpy(), {name: utilities.loc[name].to_numpy() for name in names}
    )
    table["removed"] = measured.drop_duplicates("ranking").set_index("ranking")["removed"].reindex(names)
    write_table(table.reset_index(), out)
    return table


def multifidelity(
    *,
    cheap_plan: str,
    cheap: str,
    retrained_plan: str,
    retrained: str,
    contributors: str,
    confidence: float,
    values_out: str,
    summary_out: str,
) -> None:
    """Multi-fidelity values of the retraining game (:mod:`diffcredit.multifidelity`) as a ``values.csv`` table."""
    from diffcredit.coalitions import read_coalitions, read_contributors
    from diffcredit.multifidelity import multifidelity_values
    from diffcredit.shapley import read_utilities

    measured = read_utilities(cheap)
    result = multifidelity_values(
        _measured_prefix(read_coalitions(cheap_plan), measured),
        measured,
        read_coalitions(retrained_plan),
        read_utilities(retrained),
        contributors=read_contributors(contributors),
        confidence=confidence,
    )
    write_table(result.table, values_out, sep=",")
    write_json(summary_out, _json_ready(result.summary()))


def evaluation_report(
    *,
    values: dict[str, str],
    contributors: str,
    alpha: float | list[float],
    lds_plan: str,
    lds_retrain: str,
    agreement_plan: str,
    agreement: dict[str, str],
    estimation_plan: str,
    estimation: dict[str, str],
    multifidelity: str | None,
    counterfactual: str,
    benchmarks: str,
    jobs: dict[str, list[str]],
    confidence: float,
    report_out: str,
    lds_out: str,
    methods_out: str,
    methods_figure: str,
    budget_out: str,
    budget_figure: str,
) -> dict:
    """LDS of each ranking per alpha, agreement of sft/finetune utilities with retraining, the budget-matched
    comparison, every method's LDS beside its wall time and peak memory, overhead, counterfactuals and each
    ranking's value, interval and rank per contributor (``contributors``). Besides the ``values`` files, the
    rankings include ``retrain_shapley``: the estimator's values of the retraining game from the agreement plan.

    ``jobs`` names, per ranking, the benchmark files (globs under ``benchmarks``) of the jobs that computed it.
    The keys of the returned (and written) report are those of benchmarks/results.json.
    """
    from diffcredit.coalitions import member_sets, read_coalitions, read_contributors
    from diffcredit.evaluation import alphas, lds, utility_agreement
    from diffcredit.shapley import aggregate

    everyone = read_contributors(contributors)
    shares = alphas(alpha)
    headline = 0.5 if 0.5 in shares else shares[0]
    protocol = _lds_protocol(lds_plan, lds_retrain, shares, len(everyone))
    tables = {mode: pd.read_csv(path, sep="\t") for mode, path in agreement.items()}
    ranked = {name: _ranked(pd.read_csv(path)) for name, path in values.items()}
    # Shapley values of the retraining game itself, from the retrained agreement coalitions (a short plan).
    ranked["retrain_shapley"] = _ranked(
        aggregate(read_coalitions(agreement_plan), tables["retrain"], contributors=everyone, convergence=False).table
    )
    rankings = {name: table["value"] for name, table in ranked.items()}
    by_alpha = {
        share: {name: lds(scores, *protocol[share], confidence).to_dict() for name, scores in rankings.items()}
        for share in shares
    }
    write_table(
        pd.DataFrame(
            [{"alpha": share, "ranking": name, **row} for share, rows in by_alpha.items() for name, row in rows.items()]
        ),
        lds_out,
    )

    sizes = pd.Series({c: len(m) for c, m in member_sets(read_coalitions(agreement_plan)).items()})
    truth = _runs(agreement["retrain"])
    agree = {
        mode: utility_agreement(tables[mode].groupby("coalition")["utility"].mean(), truth, sizes)
        for mode in ("sft", "finetune")
    }
    # Cost of one coalition's utility (train + sample + score), over coalitions that train (not the empty one).
    cost = {mode: float(t.loc[t["n_items"] > 0, "seconds"].median()) for mode, t in tables.items()}

    bench = Path(benchmarks)
    setup = {stage: _job_seconds(bench / f"{stage}.tsv") for stage in ("train_full", "prune", "recover", "reference")}
    plans = {
        mode: (_measured_prefix(read_coalitions(estimation_plan), measured), measured)
        for mode, measured in ((mode, pd.read_csv(path, sep="\t")) for mode, path in estimation.items())
    }
    plans["retrain"] = (read_coalitions(agreement_plan), tables["retrain"])
    curve = _budget_comparison(plans, protocol, setup, everyone, confidence)
    if multifidelity is not None:  # one point per alpha: every sft coalition plus the retrained prefix
        seconds = sum(setup[stage] or 0.0 for stage in _MODE_SETUP["sft"]) + sum(
            float(plans[mode][1]["seconds"].sum()) for mode in ("sft", "retrain")
        )
        points = [
            {
                "mode": "multifidelity",
                "alpha": share,
                "budget": len(plans["sft"][0]),
                "seconds": seconds,
                "lds": row["value"],
                "ci_low": row["ci_low"],
                "ci_high": row["ci_high"],
                "seed_averaged": row["seed_averaged"],
            }
            for share, row in ((share, by_alpha[share]["multifidelity_shapley"]) for share in shares)
        ]
        curve = pd.concat([curve, pd.DataFrame(points)], ignore_index=True)
    write_table(curve, budget_out)
    plot_budget(curve, budget_figure, confidence=confidence)

    methods = pd.DataFrame(
        [
            {
                "ranking": name,
                "alpha": headline,
                **{k: by_alpha[headline][name][k] for k in _LDS_COLUMNS},
                **{f"lds_alpha_{share:g}": by_alpha[share][name]["value"] for share in shares},
                **job_costs(bench, jobs.get(name, [])),
            }
            for name in rankings
        ]
    )
    write_table(methods, methods_out)
    plot_methods(methods, methods_figure, confidence=confidence)

    rows = by_alpha[headline]
    report = {
        "seconds_per_coalition": cost,
        "sft_cost_ratio": cost["retrain"] / cost["sft"],
        "finetune_cost_ratio": cost["retrain"] / cost["finetune"],
        "pearson_sft_retrain": agree["sft"]["pearson"],
        "spearman_sft_retrain": agree["sft"]["spearman"],
        "spearman_sft_retrain_size_removed": agree["sft"]["spearman_size_removed"],
        "spearman_sft_retrain_partial_size": agree["sft"]["spearman_partial_size"],
        "pearson_finetune_retrain": agree["finetune"]["pearson"],
        "spearman_finetune_retrain": agree["finetune"]["spearman"],
        "spearman_finetune_retrain_size_removed": agree["finetune"]["spearman_size_removed"],
        "retrain_seed_cv": agree["sft"]["retrain_seed_cv"],
        "agreement": agree,
        "lds_alpha": headline,
        "lds": rows,
        "lds_by_alpha": {f"{share:g}": table for share, table in by_alpha.items()},
        **{f"lds_{name}": row["value"] for name, row in rows.items()},
        **{f"lds_seed_averaged_{name}": row["seed_averaged"] for name, row in rows.items()},
        "multifidelity": json.loads(Path(multifidelity).read_text()) if multifidelity else None,
        "methods": methods.to_dict(orient="records"),
        "budget_curve": curve.to_dict(orient="records"),
        "setup_seconds": setup,
        "counterfactual": pd.read_csv(counterfactual, sep="\t").to_dict(orient="records"),
        "contributors": {name: table.reset_index().to_dict(orient="records") for name, table in ranked.items()},
        "overhead_fraction": job_overhead(bench),
    }
    write_json(report_out, _json_ready(report))
    return report


# What a coalition of each mode needs before it: the full model (sft, finetune), pruned and recovered (sft).
_MODE_SETUP = {"sft": ("train_full", "prune", "recover"), "finetune": ("train_full",), "retrain": ()}


def _lds_protocol(
    lds_plan: str, lds_retrain: str, shares: tuple[float, ...], n: int
) -> dict[float, tuple[list[tuple[str, ...]], np.ndarray]]:
    """Per alpha, its held-out subsets (known by their size, int(alpha * n)) and their retrained utilities."""
    from diffcredit.coalitions import member_sets, read_coalitions
    from diffcredit.evaluation import subset_size

    subsets = member_sets(read_coalitions(lds_plan))
    retrained = _runs(lds_retrain)
    protocol = {}
    for share in shares:
        runs = retrained.loc[[c for c in retrained.index if len(subsets[c]) == subset_size(share, n)]]
        protocol[share] = ([subsets[c] for c in runs.index], runs.to_numpy())
    return protocol


def _budget_comparison(
    plans: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
    protocol: dict,
    setup: dict[str, float | None],
    contributors: list[str],
    confidence: float,
) -> pd.DataFrame:
    """LDS against compute per mode and alpha (:func:`diffcredit.evaluation.budget_curve`), with the setup each
    mode's coalitions need counted once."""
    from diffcredit.evaluation import budget_curve

    curves = []
    for share, (subsets, measured) in protocol.items():
        for mode, (plan, utilities) in plans.items():
            start = sum(setup[stage] or 0.0 for stage in _MODE_SETUP[mode])
            curve = budget_curve(
                plan,
                utilities,
                subsets=subsets,
                measured=measured,
                contributors=contributors,
                setup_seconds=start,
                confidence=confidence,
            )
            curves.append(curve.assign(mode=mode, alpha=share))
    return pd.concat(curves, ignore_index=True)


_LDS_COLUMNS = (
    "value",
    "ci_low",
    "ci_high",
    "bootstrap_low",
    "bootstrap_high",
    "seed_averaged",
    "n_subsets",
    "n_seeds",
)


def job_costs(benchmarks: Path, patterns: list[str]) -> dict[str, float | int | None]:
    """Wall time and peak memory of the jobs whose benchmark files match ``patterns`` (globs under ``benchmarks``).

    ``wall_seconds`` sums the jobs' wall times; a coalition job that found some coalitions stored (measured by an
    earlier job of another plan) also counts their measured seconds, so the figure is the method's cost had it run
    alone. ``peak_rss_mb`` is the largest ``max_rss`` of those jobs (Snakemake's benchmark column, MB).
    """
    files = sorted({path for pattern in patterns for path in benchmarks.glob(pattern)})
    wall, peak = 0.0, None
    for bench in files:
        row = pd.read_csv(bench, sep="\t").iloc[0]
        wall += float(row["s"])
        batch = _batch_table(bench)
        if batch is not None:
            wall += float(batch.loc[~batch["fresh"], "seconds"].sum())
        rss = pd.to_numeric(pd.Series([row.get("max_rss")]), errors="coerce").iloc[0]
        if np.isfinite(rss):
            peak = float(rss) if peak is None else max(peak, float(rss))
    return {"wall_seconds": wall if files else None, "peak_rss_mb": peak, "n_jobs": len(files)}


def job_overhead(benchmarks: Path) -> float | None:
    """Share of coalition jobs' wall time not spent measuring coalitions (process start-up, imports, loading).

    Only the rows a job measured itself count as its compute; jobs that measured nothing (all stored) are left out:
    their wall time is the overhead of a rerun, not of measuring.
    """
    wall = compute = 0.0
    for bench in benchmarks.glob("*/*/b*.tsv"):
        rows = _batch_table(bench)
        if rows is None:
            continue
        measured = rows.loc[rows["fresh"], "seconds"].sum()
        if measured <= 0:
            continue
        seconds = float(pd.read_csv(bench, sep="\t")["s"].iloc[0])
        wall, compute = wall + seconds, compute + measured
    return (wall - compute) / compute if compute else None


def _batch_table(bench: Path) -> pd.DataFrame | None:
    """The batch table of a coalition job's benchmark file ``<mode>/<plan>/bNNNNN.tsv``, if it is one."""
    if not re.fullmatch(r"b\d{5}\.tsv", bench.name):
        return None
    mode, plan = bench.parent.parent.name, bench.parent.name
    table = bench.parents[3] / mode / plan / "batches" / bench.name
    return pd.read_csv(table, sep="\t") if table.exists() else None


def _measured_prefix(plan: pd.DataFrame, utilities: pd.DataFrame) -> pd.DataFrame:
    """The plan's rows up to the first one without a utility: an adaptive run measures a prefix of its plan."""
    measured = plan["coalition"].isin(utilities["coalition"]).to_numpy()
    return plan.head(int(measured.argmin()) if not measured.all() else len(plan))


def _job_seconds(bench: Path) -> float | None:
    return float(pd.read_csv(bench, sep="\t")["s"].iloc[0]) if bench.exists() else None


def plot_methods(methods: pd.DataFrame, path: str, *, confidence: float) -> None:
    """Every method's LDS with both intervals (left) beside its wall time and peak memory (right)."""
    from diffcredit.figures import pyplot

    plt = pyplot()
    table = methods.sort_values("value", na_position="first").reset_index(drop=True)
    y = np.arange(len(table))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(2.5, 0.4 * len(table) + 1.2)), sharey=True)
    left.hlines(
        y, table["bootstrap_low"], table["bootstrap_high"], color="grey", linewidth=1, label="bootstrap over subsets"
    )
    left.hlines(y, table["ci_low"], table["ci_high"], color="#4878a8", linewidth=4, label="over seeds (paper)")
    left.plot(table["value"], y, "o", color="black", label="LDS (mean over seeds)")
    left.plot(table["seed_averaged"], y, "x", color="#c44e52", label="Spearman vs seed-mean property")
    left.set_yticks(y, table["ranking"])
    left.axvline(0, color="grey", linewidth=0.8)
    left.set_xlim(-1.05, 1.05)
    left.set_xlabel(f"LDS at alpha = {table['alpha'].iloc[0]:g} ({confidence:.0%} intervals)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    wall = table["wall_seconds"].astype(float)
    right.barh(y, wall.fillna(0), color="#4878a8", height=0.6)
    for row, (seconds, rss) in enumerate(zip(wall, table["peak_rss_mb"], strict=True)):
        label = (
            "not measured"
            if not np.isfinite(seconds)
            else (
                f"{seconds:.3g} s" + (f", {float(rss):.0f} MB" if rss is not None and np.isfinite(float(rss)) else "")
            )
        )
        right.text(seconds if np.isfinite(seconds) else 0, row, " " + label, va="center", fontsize=7)
    if (wall > 0).any():
        right.set_xscale("log")
    right.set_xlabel("wall time of the method's own jobs (s); peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" keeps the legend below the axes
    plt.close(fig)


def plot_budget(curve: pd.DataFrame, path: str, *, confidence: float) -> None:
    """LDS against compute for retrain-, finetune- and sft-Shapley (one panel per alpha), and the multi-fidelity
    point: the paper's budget-matched comparison."""
    from diffcredit.figures import pyplot

    plt = pyplot()
    shares = sorted(curve["alpha"].unique())
    fig, axes = plt.subplots(1, len(shares), figsize=(5.5 * len(shares), 4), squeeze=False)
    for ax, share in zip(axes[0], shares, strict=True):
        for mode, rows in curve[curve["alpha"] == share].groupby("mode", sort=False):
            rows = rows.sort_values("seconds")
            style = "*" if mode == "multifidelity" else "o-"
            ax.errorbar(
                rows["seconds"],
                rows["lds"],
                yerr=[rows["lds"] - rows["ci_low"], rows["ci_high"] - rows["lds"]],
                fmt=style,
                capsize=3,
                markersize=10 if mode == "multifidelity" else 4,
                label=mode,
            )
        ax.set_xscale("log")
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("compute (s): setup + every measured coalition")
        ax.set_ylabel(f"LDS at alpha = {share:g} ({confidence:.0%} interval over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _values(path: str) -> pd.Series:
    return pd.read_csv(path).set_index("contributor")["value"]


def _ranked(values: pd.DataFrame) -> pd.DataFrame:
    """A ranking's values with their intervals where it has them (NaN otherwise) and the rank (1 = highest)."""
    table = values.set_index("contributor").reindex(columns=["value", "ci_low", "ci_high"])
    return table.assign(rank=table["value"].rank(ascending=False, method="min").astype(int))


def _runs(path: str) -> pd.DataFrame:
    """Utilities as a coalition x repeat table."""
    return pd.read_csv(path, sep="\t").pivot(index="coalition", columns="repeat", values="utility")


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
