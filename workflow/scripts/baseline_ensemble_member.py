"""Train one ensemble member from scratch on the contributors its code column selects."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import ensembles

stages.set_threads(snakemake.threads)
ensembles.train_member(
    codes=snakemake.input.codes,
    member=int(snakemake.wildcards.member),
    train_data=snakemake.input.train,
    unet=snakemake.params.unet,
    schedule=snakemake.params.schedule,
    family=snakemake.params.family,
    out=snakemake.output[0],
    seed=snakemake.params.seed,
    **snakemake.params.training,
)
