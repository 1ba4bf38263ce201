"""One TRAK-family method's contributor scores from the stored features."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit.attribution import trak

trak.write_values(
    method=snakemake.wildcards.trak_method,
    features=snakemake.input.features,
    train_data=snakemake.input.train,
    out=snakemake.output[0],
    lam=snakemake.params.lam,
    aggregate=snakemake.params.aggregate,
)
