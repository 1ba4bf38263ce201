"""Real images beside samples of the full, recovered and a few coalitions' models."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.set_threads(snakemake.threads)
stages.sample_figure(
    heldout_data=snakemake.input.heldout,
    full_model=snakemake.input.full,
    recovered_model=snakemake.input.recovered,
    utilities=snakemake.input.utilities,
    coalitions=snakemake.input.plan,
    store=snakemake.params.store,
    schedule=snakemake.params.schedule,
    family=snakemake.params.family,
    inference_steps=snakemake.params.inference_steps,
    sampler=snakemake.params.sampler,
    seed=snakemake.params.seed,
    out=snakemake.output[0],
)
