"""The plan's values with confidence intervals, the convergence and rounds tables, and their figures."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.aggregate(
    coalitions=snakemake.input.plan,
    utilities=snakemake.input.utilities,
    contributors=snakemake.input.contributors,
    confidence=snakemake.params.confidence,
    round_values=list(snakemake.input.round_values),
    decisions=list(snakemake.input.decisions),
    values_out=snakemake.output.values,
    convergence_out=snakemake.output.convergence,
    rounds_out=snakemake.output.rounds,
    figure_out=snakemake.output.figure,
    convergence_figure_out=snakemake.output.convergence_figure,
)
