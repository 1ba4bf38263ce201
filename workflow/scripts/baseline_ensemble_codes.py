"""Draw the contributors' ensemble codes (which members train on whom)."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit.attribution import ensembles

ensembles.write_codes(
    contributors=snakemake.input.contributors,
    n_members=snakemake.params.members,
    seed=snakemake.params.seed,
    out=snakemake.output[0],
)
