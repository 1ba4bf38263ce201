"""Retrain without one ranking's top contributors (or none: the baseline; or a random control's) over the seeds."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import fidelity, stages

stages.set_threads(snakemake.threads)
fidelity.counterfactual_runs(
    ranking=snakemake.wildcards.ranking,
    values=snakemake.input.values or None,
    train_data=snakemake.input.train,
    reference=snakemake.input.reference,
    fraction=snakemake.params.fraction,
    repeats=snakemake.params.repeats,
    settings=dict(snakemake.params.settings),
    store=snakemake.params.store,
    out=snakemake.output[0],
)
