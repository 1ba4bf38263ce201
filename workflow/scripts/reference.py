"""Fit the feature extractor and cache the reference statistics of the held-out real images."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from diffcredit import stages

stages.set_threads(snakemake.threads)
stages.prepare_reference(
    train_data=snakemake.input.train,
    heldout_data=snakemake.input.heldout,
    out=snakemake.output[0],
    seed=snakemake.params.seed,
    **snakemake.params.features,
)
