"""Pixel or embedding similarity of each contributor's images to the targets (mean or max per target)."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import similarity

stages.set_threads(snakemake.threads)
targets = similarity.targets_for(
    model=snakemake.input.model,
    heldout_data=snakemake.input.heldout,
    inference_steps=snakemake.params.inference_steps,
    sampler=snakemake.params.sampler,
    schedule=snakemake.params.schedule,
    seed=snakemake.params.seed,
    **snakemake.params.settings,
)
similarity.write_values(
    train_data=snakemake.input.train,
    targets=targets,
    reference=snakemake.input.reference,
    outs={snakemake.wildcards.similarity: snakemake.output[0]},
)
