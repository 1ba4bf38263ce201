# DiffCredit: Shapley values of a diffusion model's global property for its data contributors.
# Stages: data -> full model -> prune -> recover -> plan -> per-coalition utilities -> Shapley values -> bundle.
import os

from snakemake.utils import min_version, validate

from diffcredit.reproducibility import job_environment

min_version("9.0")

# Every job imports the package from this checkout and runs pinned CPU kernels (see diffcredit.reproducibility).
os.environ.update(job_environment(f"{workflow.basedir}/src"))


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/coalitions.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/bundle.smk"


rule all:
    default_target: True
    input:
        default_targets(),
