"""Write the coalition plan that the workflow expanded at parse time."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.write_plan(snakemake.params.spec, snakemake.output[0])
