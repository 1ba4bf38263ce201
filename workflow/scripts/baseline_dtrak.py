"""D-TRAK scores of the contributors for the full model's generations (or the held-out images)."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from diffcredit import stages
from diffcredit.attribution import dtrak

stages.set_threads(snakemake.threads)
dtrak.write_values(
    model=snakemake.input.model,
    train_data=snakemake.input.train,
    heldout_data=snakemake.input.heldout,
    out=snakemake.output[0],
    inference_steps=snakemake.params.inference_steps,
    sampler=snakemake.params.sampler,
    schedule=snakemake.params.schedule,
    seed=snakemake.params.seed,
    **snakemake.params.settings,
)
