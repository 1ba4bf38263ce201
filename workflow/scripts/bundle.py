"""Archive the run's results with checksums."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

stages.set_threads(snakemake.threads)  # so the recorded thread count is the jobs' (rules' threads)
files = {name: path for name, path in snakemake.input.items() if name != "reference"}
stages.bundle(files, snakemake.output.checksums, config=snakemake.params.config, reference=snakemake.input.reference)
