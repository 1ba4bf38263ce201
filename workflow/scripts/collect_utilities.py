"""Concatenate the job tables of one plan into its utilities table."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.collect_utilities(list(snakemake.input), snakemake.output[0])
