"""Ablate each contributor from the encoded ensemble and score the property of its generations."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import ensembles

stages.set_threads(snakemake.threads)
ensembles.write_values(
    codes=snakemake.input.codes,
    members=list(snakemake.input.members),
    train_data=snakemake.input.train,
    reference=snakemake.input.reference,
    property=snakemake.params.property,
    property_options=dict(snakemake.params.property_options),
    out=snakemake.output.ensembles,
    contrast_out=snakemake.output.contrast,
    schedule=snakemake.params.schedule,
    family=snakemake.params.family,
    seed=snakemake.params.seed,
    **snakemake.params.generation,
)
