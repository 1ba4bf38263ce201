"""LDS of every ranking, utility agreement with retraining, counterfactuals and costs, in one report."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from diffcredit import fidelity

fidelity.evaluation_report(
    values={name: snakemake.input[name] for name in snakemake.params.rankings},
    lds_plan=snakemake.input.lds_plan,
    lds_retrain=snakemake.input.lds_retrain,
    agreement_plan=snakemake.input.agreement_plan,
    agreement={mode: snakemake.input[f"agreement_{mode}"] for mode in ("retrain", "sft", "finetune")},
    counterfactual=snakemake.input.counterfactual,
    benchmarks=snakemake.params.benchmarks,
    confidence=snakemake.params.confidence,
    report_out=snakemake.output.report,
    lds_out=snakemake.output.lds,
)
