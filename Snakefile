# DiffCredit: Shapley values of a diffusion model's global property for its data contributors.
# Stages: data -> full model -> prune -> recover -> plan -> per-coalition utilities -> Shapley values -> bundle.
import os

from snakemake.utils import min_version, validate

min_version("9.0")

# Jobs import the package from this checkout's src/, also inside a `--sdm conda` env (which holds only the pinned
# dependencies, see envs/diffcredit.yaml) and on SLURM nodes (the profile exports the environment).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [f"{workflow.basedir}/src", os.environ.get("PYTHONPATH")]))
# CPU results are bit-identical only for the same kernels: pin torch's, oneDNN's and MKL's instruction set to AVX2 so
# x86 machines with and without AVX-512 compute the same bytes (export other values to override; README).
for variable, value in {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}.items():
    os.environ.setdefault(variable, value)


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
    input:
        default_targets(),
    default_target: True
