"""Measure the utilities of one job's coalitions (fine-tune -> sample -> score each)."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.set_threads(snakemake.threads)
stages.coalition_utilities(
    batch=dict(snakemake.params.batch),
    train_data=snakemake.input.train,
    reference=snakemake.input.reference,
    start_model=snakemake.input.start_model or None,
    store=snakemake.params.store,
    out=snakemake.output[0],
    repeats=snakemake.params.repeats,
    settings=dict(snakemake.params.settings),
    keep=list(snakemake.params.keep),
    keep_dir=snakemake.params.keep_dir,
)
