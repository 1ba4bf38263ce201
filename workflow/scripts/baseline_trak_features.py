"""Projected gradients (TRAK features) of the training items and the targets for one output function."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import trak

stages.set_threads(snakemake.threads)
trak.write_features(
    output=snakemake.wildcards.trak_output,
    model=snakemake.input.model,
    train_data=snakemake.input.train,
    heldout_data=snakemake.input.heldout,
    family=snakemake.params.family,
    out=snakemake.output[0],
    inference_steps=snakemake.params.inference_steps,
    sampler=snakemake.params.sampler,
    schedule=snakemake.params.schedule,
    seed=snakemake.params.seed,
    **snakemake.params.settings,
)
