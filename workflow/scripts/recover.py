"""Fine-tune the pruned model on all data."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.set_threads(snakemake.params.threads)
stages.recover(
    pruned_model=snakemake.input.model,
    train_data=snakemake.input.train,
    out=snakemake.output.model,
    stats_out=snakemake.output.stats,
    schedule=snakemake.params.schedule,
    family=snakemake.params.family,
    seed=snakemake.params.seed,
    **snakemake.params.training,
)
