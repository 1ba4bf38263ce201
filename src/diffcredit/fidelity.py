"""The `evaluate` target's stages: counterfactual retraining and the fidelity report against retraining from scratch.

Rule adapters like :mod:`diffcredit.stages`; the measures themselves (LDS, agreement, counterfactual tables) live in
:mod:`diffcredit.evaluation`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from diffcredit.contributors import ContributorData
from diffcredit.io import write_json, write_table
from diffcredit.stages import utility_settings
from diffcredit.utility import UtilityStore, evaluate_coalitions


def counterfactual(
    *, values: dict[str, str], train_data: str, reference: str, fraction: float, repeats: int, settings: dict,
    store: str, out: str, log=print,
) -> pd.DataFrame:
    """Retrain without the top `fraction` of contributors of each ranking (and of a seeded random ranking).

    The table has one row per ranking after a ``full`` baseline: the utility's mean over training seeds, its interval
    and its change against the baseline (negative: removing those contributors hurt), and the removed contributors.
    """
    from diffcredit.evaluation import counterfactual_removals, counterfactual_table, random_ranking

    data = ContributorData.load(train_data)
    everyone = data.contributor_ids
    rankings = {name: _values(path) for name, path in values.items()}
    rankings["random"] = random_ranking(everyone, seed=settings["seed"])
    removed = {name: counterfactual_removals(scores, fraction) for name, scores in rankings.items()}
    kept = {"full": everyone} | {name: [c for c in everyone if c not in gone] for name, gone in removed.items()}
    plan = pd.DataFrame({"coalition": list(kept), "members": [",".join(m) for m in kept.values()]})
    measured = evaluate_coalitions(plan, repeats=repeats, data=data, settings=utility_settings(data, settings),
                                   start_model=None, store=UtilityStore(store), reference_dir=reference, log=log)
    runs = measured.pivot(index="coalition", columns="repeat", values="utility")
    table = counterfactual_table(runs.loc["full"].to_numpy(), {name: runs.loc[name].to_numpy() for name in removed})
    table["removed"] = pd.Series({name: ",".join(gone) for name, gone in removed.items()})
    write_table(table.reset_index(), out)
    return table


def evaluation_report(
    *, values: dict[str, str], lds_plan: str, lds_retrain: str, agreement_plan: str, agreement: dict[str, str],
    counterfactual: str, benchmarks: str, confidence: float, report_out: str, lds_out: str,
) -> dict:
    """LDS of each ranking, agreement of sft/finetune utilities with retraining, costs, overhead and counterfactuals.

    The keys of the returned (and written) report are those of benchmarks/results.json.
    """
    from diffcredit.coalitions import member_sets, read_coalitions
    from diffcredit.evaluation import lds, utility_agreement

    subsets = member_sets(read_coalitions(lds_plan))
    retrained = _runs(lds_retrain)
    lds_rows = {
        name: lds(_values(path), [subsets[c] for c in retrained.index], retrained.to_numpy(), confidence).to_dict()
        for name, path in values.items()
    }
    write_table(pd.DataFrame(lds_rows).T.rename_axis("ranking").reset_index(), lds_out)

    sizes = pd.Series({c: len(m) for c, m in member_sets(read_coalitions(agreement_plan)).items()})
    truth = _runs(agreement["retrain"])
    tables = {mode: pd.read_csv(path, sep="\t") for mode, path in agreement.items()}
    agree = {mode: utility_agreement(tables[mode].groupby("coalition")["utility"].mean(), truth, sizes)
             for mode in ("sft", "finetune")}
    # Cost of one coalition's utility (train + sample + score), over coalitions that train (not the empty one).
    cost = {mode: float(t.loc[t["n_items"] > 0, "seconds"].median()) for mode, t in tables.items()}
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
        "lds": lds_rows,
        **{f"lds_{name}": row["value"] for name, row in lds_rows.items()},
        "counterfactual": pd.read_csv(counterfactual, sep="\t").to_dict(orient="records"),
        "overhead_fraction": job_overhead(Path(benchmarks)),
    }
    write_json(report_out, _json_ready(report))
    return report


def job_overhead(benchmarks: Path) -> float | None:
    """Share of coalition jobs' wall time not spent measuring coalitions (process start-up, imports, loading).

    Only the rows a job measured itself count as its compute; jobs that measured nothing (all stored) are left out:
    their wall time is the overhead of a rerun, not of measuring.
    """
    wall = compute = 0.0
    for bench in benchmarks.glob("*/*/b*.tsv"):
        mode, plan = bench.parent.parent.name, bench.parent.name
        table = benchmarks.parent / mode / plan / "batches" / bench.name
        if not table.exists():
            continue
        rows = pd.read_csv(table, sep="\t")
        measured = rows.loc[rows["fresh"], "seconds"].sum()
        if measured <= 0:
            continue
        seconds = float(pd.read_csv(bench, sep="\t")["s"].iloc[0])
        wall, compute = wall + seconds, compute + measured
    return (wall - compute) / compute if compute else None


def _values(path: str) -> pd.Series:
    return pd.read_csv(path).set_index("contributor")["value"]


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
