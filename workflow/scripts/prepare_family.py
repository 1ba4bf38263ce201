"""Prepare the model family once: a latent family's autoencoder and cached latents, a text family's captions and base."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.set_threads(snakemake.params.threads)
stages.prepare_family(
    train_data=snakemake.input.train,
    heldout_data=snakemake.input.heldout,
    out=snakemake.output[0],
    model=dict(snakemake.params.model),
    seed=snakemake.params.seed,
)
