"""In-Run Data Shapley of the contributors over a training run validated on the held-out images."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from diffcredit import stages
from diffcredit.attribution import inrun

stages.set_threads(snakemake.threads)
inrun.write_values(
    model=snakemake.input.model,
    train_data=snakemake.input.train,
    heldout_data=snakemake.input.heldout,
    out=snakemake.output[0],
    schedule=snakemake.params.schedule,
    seed=snakemake.params.seed,
    **snakemake.params.settings,
)
