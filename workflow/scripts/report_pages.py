"""The report's pages: the values with their intervals, the cost of every stage, the configuration."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import report

report.values_page(
    snakemake.input.values,
    snakemake.input.rounds,
    snakemake.output.values,
    estimator=snakemake.params.estimator,
    kind=snakemake.params.kind,
    confidence=snakemake.params.confidence,
    reference=snakemake.input.reference,
)
report.costs_page(dict(snakemake.params.benchmarks), snakemake.output.costs)
report.config_page(snakemake.config, snakemake.output.config)
