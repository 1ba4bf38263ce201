"""Multi-fidelity values of the retraining game: every sft coalition plus the retrained prefix of the plan."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import fidelity

fidelity.multifidelity(
    cheap_plan=snakemake.input.cheap_plan,
    cheap=snakemake.input.cheap,
    retrained_plan=snakemake.input.retrained_plan,
    retrained=snakemake.input.retrained,
    contributors=snakemake.input.contributors,
    confidence=snakemake.params.confidence,
    values_out=snakemake.output.values,
    summary_out=snakemake.output.summary,
)
