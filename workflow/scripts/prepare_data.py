"""Load the contributors' data and the real reference images (the buyer's, or a held-out share of the items)."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages

data = snakemake.params.data
stages.prepare_data(
    source=data["source"],
    path=data["path"],
    manifest=data["manifest"],
    heldout_fraction=data["heldout_fraction"],
    reference=data["reference"],
    marketplace=snakemake.params.marketplace,
    seed=snakemake.params.seed,
    train_out=snakemake.output.train,
    heldout_out=snakemake.output.heldout,
    contributors_out=snakemake.output.contributors,
)
