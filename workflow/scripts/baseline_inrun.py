"""In-Run Data Shapley over a replay of the full model's training run."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import inrun

stages.set_threads(snakemake.threads)
inrun.replay_values(
    train_data=snakemake.input.train,
    heldout_data=snakemake.input.heldout,
    full_model=snakemake.input.model,
    out=snakemake.output.inrun,
    first_order_out=snakemake.output.inrun_first_order,
    unet=snakemake.params.unet,
    schedule=snakemake.params.schedule,
    family=snakemake.params.family,
    seed=snakemake.params.seed,
    **snakemake.params.settings,
    **snakemake.params.training,
)
