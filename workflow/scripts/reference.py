"""Fit the feature extractor and cache the reference statistics of the real reference images."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.set_threads(snakemake.params.threads)
stages.prepare_reference(
    train_data=snakemake.input.train or None,  # empty with a trusted reference: the extractor never sees the items
    heldout_data=snakemake.input.heldout,
    out=snakemake.output[0],
    seed=snakemake.params.seed,
    reference=snakemake.params.reference,
    **snakemake.params.features,
)
