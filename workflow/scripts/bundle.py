"""Archive the run's results with checksums."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from diffcredit import stages

stages.bundle(dict(snakemake.input), snakemake.output.checksums, config=snakemake.params.config)
