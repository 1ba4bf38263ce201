"""LDS of every ranking per alpha, the budget-matched comparison, every method's cost, utility agreement with
retraining, counterfactuals and overhead, in one report with its tables and figures."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import fidelity

fidelity.evaluation_report(
    values={name: snakemake.input[name] for name in snakemake.params.rankings},
    contributors=snakemake.input.contributors,
    alpha=snakemake.params.alpha,
    lds_plan=snakemake.input.lds_plan,
    lds_retrain=snakemake.input.lds_retrain,
    agreement_plan=snakemake.input.agreement_plan,
    agreement={mode: snakemake.input[f"agreement_{mode}"] for mode in ("retrain", "sft", "finetune")},
    estimation_plan=snakemake.input.estimation_plan,
    estimation={mode: snakemake.input[f"estimation_{mode}"] for mode in ("sft", "finetune")},
    multifidelity=snakemake.input.multifidelity or None,
    counterfactual=snakemake.input.counterfactual,
    benchmarks=snakemake.params.benchmarks,
    jobs=dict(snakemake.params.jobs),
    confidence=snakemake.params.confidence,
    report_out=snakemake.output.report,
    lds_out=snakemake.output.lds,
    methods_out=snakemake.output.methods,
    methods_figure=snakemake.output.methods_figure,
    budget_out=snakemake.output.budget,
    budget_figure=snakemake.output.budget_figure,
)
