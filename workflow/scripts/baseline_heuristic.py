"""One of the paper's property heuristics (aesthetic score, embedding distance) per contributor."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit.progress import log_to_stderr

log_to_stderr()  # the package's progress lines (rate, ETA) go to the rule log

from diffcredit import stages
from diffcredit.attribution import heuristics

stages.set_threads(snakemake.threads)
heuristics.write_values(
    train_data=snakemake.input.train,
    reference=snakemake.input.reference,
    outs={snakemake.wildcards.heuristic: snakemake.output[0]},
    predictor=snakemake.params.predictor,
)
