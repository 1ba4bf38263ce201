"""One adaptive round: the values of the plan prefix it evaluated, and whether another round runs."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.round_values(
    coalitions=snakemake.input.plan,
    utilities=snakemake.input.utilities,
    contributors=snakemake.input.contributors,
    confidence=snakemake.params.confidence,
    previous=snakemake.input.previous or None,
    values_out=snakemake.output.values,
    decision_out=snakemake.output.decision,
    **snakemake.params.round,
)
