"""Add-one-in values v({i}) - v(∅) with intervals over training seeds."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import addition
from diffcredit.contributors import ContributorData

stages.set_threads(snakemake.threads)
addition.write_values(
    train_data=snakemake.input.train,
    reference=snakemake.input.reference,
    start_model=snakemake.input.start or None,
    store=snakemake.params.store,
    settings=stages.utility_settings(ContributorData.load(snakemake.input.train), snakemake.params.settings),
    repeats=snakemake.params.repeats,
    out=snakemake.output[0],
    confidence=snakemake.params.confidence,
)
