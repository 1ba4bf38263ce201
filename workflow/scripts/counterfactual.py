"""The counterfactual table: the property after each ranking's removal against the full-data baseline."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from diffcredit import fidelity

fidelity.counterfactual(runs=list(snakemake.input), out=snakemake.output[0])
