"""Pixel or embedding similarity of each contributor's images to the targets (mean or max per target)."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import similarity
from diffcredit.contributors import ContributorData

stages.set_threads(snakemake.threads)
family = stages.model_family(
    ContributorData.load(snakemake.input.train), snakemake.params.family, schedule=snakemake.params.schedule
)
targets = similarity.targets_for(
    family=family,
    model=family.load(snakemake.input.model),
    heldout_data=snakemake.input.heldout,
    inference_steps=snakemake.params.inference_steps,
    sampler=snakemake.params.sampler,
    seed=snakemake.params.seed,
    **snakemake.params.settings,
)
similarity.write_values(
    train_data=snakemake.input.train,
    targets=targets,
    reference=snakemake.input.reference,
    outs={snakemake.wildcards.similarity: snakemake.output[0]},
)
