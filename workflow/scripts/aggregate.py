"""Shapley values with confidence intervals, the convergence table and the values figure."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from diffcredit import stages

stages.aggregate(
    coalitions=snakemake.input.plan,
    utilities=snakemake.input.utilities,
    contributors=snakemake.input.contributors,
    confidence=snakemake.params.confidence,
    values_out=snakemake.output.values,
    convergence_out=snakemake.output.convergence,
    figure_out=snakemake.output.figure,
)
