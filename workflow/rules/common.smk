# Parse-time helpers: paths, the coalition plans (static, so `snakemake -n` lists every coalition job), settings
# handed to the scripts, and resources scaled by attempt.
from functools import lru_cache

from diffcredit import stages
from diffcredit.contributors import contributor_ids

RUN = f"results/{config['name']}"
ENV = "../../envs/diffcredit.yaml"
ESTIMATORS = ("exact", "permutation", "kernelshap", "banzhaf", "loo")
# Plans that are not estimators: held-out subsets for the LDS, and the estimation prefix that is also retrained.
EVALUATION_PLANS = ("lds", "agreement")
START_MODEL = {"sft": f"{RUN}/models/recovered", "finetune": f"{RUN}/models/full", "retrain": []}


wildcard_constraints:
    mode="sft|finetune|retrain",
    plan="|".join(ESTIMATORS + EVALUATION_PLANS),
    batch=r"b\d{5}",


@lru_cache
def contributors():
    data = config["data"]
    return contributor_ids(data["source"], path=data["path"], manifest=data["manifest"])


def plan_spec(plan):
    """What determines the coalitions of `plan` (see diffcredit.stages.plan_table)."""
    main = config["estimator"]
    budget = config["evaluation"]["banzhaf_budget"] if plan == "banzhaf" and main["name"] != "banzhaf" else main["budget"]
    evaluation = config["evaluation"]
    return {
        "plan": plan,
        "contributors": list(contributors()),
        "seed": config["seed"],
        "budget": budget,
        "main_estimator": main["name"],
        "lds_subsets": evaluation["lds_subsets"],
        "alpha": evaluation["alpha"],
        "agreement_coalitions": evaluation["agreement_coalitions"],
    }


def plan_spec_of(wildcards):
    return plan_spec(wildcards.plan)


@lru_cache
def plan_table(plan):
    """The coalitions of `plan`, computed at parse time (deterministic from the seed; prefix-stable)."""
    return stages.plan_table(**plan_spec(plan))


@lru_cache
def batches(plan):
    """Coalition ids of `plan` in jobs of `coalitions_per_job` (fixed boundaries: a larger budget adds jobs)."""
    ids = list(plan_table(plan)["coalition"])
    size = config["coalitions_per_job"]
    return {f"b{i // size:05d}": ids[i : i + size] for i in range(0, len(ids), size)}


def batch_members(wildcards):
    return batches(wildcards.plan)[wildcards.batch]


def batch_files(wildcards):
    return expand(f"{RUN}/{wildcards.mode}/{wildcards.plan}/batches/{{batch}}.tsv", batch=batches(wildcards.plan))


def start_model(wildcards):
    return START_MODEL[wildcards.mode]


def repeats(wildcards):
    return config["evaluation"]["seeds"] if wildcards.mode == "retrain" else config["utility"]["repeats"]


def utility_settings(wildcards):
    return settings_of(wildcards.mode)


def settings_of(mode):
    """Everything that determines v(S) in `mode` (see diffcredit.utility.UtilitySettings)."""
    u, t = config["utility"], config["train"]
    retrain = mode == "retrain"
    return {
        "mode": mode,
        "steps": t["steps"] if retrain else u["finetune_steps"],
        "batch_size": t["batch_size"] if retrain else u["batch_size"],
        "lr": t["lr"] if retrain else u["lr"],
        "optimizer": t["optimizer"],
        "grad_clip": t["grad_clip"],
        "ema_decay": t["ema_decay"] if retrain else None,
        "unet": config["model"]["unet"],
        "schedule": config["model"]["schedule"],
        "property": u["property"],
        "property_options": u["property_options"],
        "n_samples": u["n_samples"],
        "inference_steps": u["inference_steps"],
        "sampler": u["sampler"],
        "seed": config["seed"],
    }


KEEP = [what for what, wanted in config["keep"].items() if wanted]


def keep_dir(wildcards):
    return f"{RUN}/{wildcards.mode}/{wildcards.plan}/kept"


def training_settings(section):
    keys = ("steps", "batch_size", "lr", "optimizer", "ema_decay", "grad_clip")
    recipe = {**config["train"], **config[section]}
    return {key: recipe[key] for key in keys}


def minutes(base):
    """Runtime in minutes for attempt 1, doubled on each retry."""

    def runtime(wildcards, attempt):
        return base * 2 ** (attempt - 1)

    return runtime


def memory(base_mb):
    def mem_mb(wildcards, attempt):
        return base_mb * attempt

    return mem_mb


def values_of(mode, plan):
    return [f"{RUN}/{mode}/{plan}/{name}" for name in ("shapley.csv", "convergence.tsv", "shapley.png")]


def default_targets():
    main = values_of(config["utility"]["mode"], config["estimator"]["name"])
    return main + [f"{RUN}/figures/samples.png", f"{RUN}/bundle/SHA256SUMS"]


def bundle_files(wildcards):
    """Name in the bundle -> produced file, for everything a reader needs to check the values."""
    mode, plan = config["utility"]["mode"], config["estimator"]["name"]
    files = {
        "contributors.tsv": f"{RUN}/data/contributors.tsv",
        "coalitions.tsv": f"{RUN}/plans/{plan}.tsv",
        "utilities.tsv": f"{RUN}/{mode}/{plan}/utilities.tsv",
        "samples.png": f"{RUN}/figures/samples.png",
    }
    for name in ("shapley.csv", "convergence.tsv", "shapley.png"):
        files[name] = f"{RUN}/{mode}/{plan}/{name}"
    for stage in ("full", "pruned", "recovered"):
        files[f"models/{stage}.json"] = f"{RUN}/models/{stage}.json"
    return files


# Rankings compared by the LDS and counterfactuals (evaluate.smk): name -> values table. The main estimator's values
# are called "shapley" whatever the estimator, so the report's keys stay stable (lds_sft_shapley, lds_loo, ...).
MAIN = config["estimator"]["name"]
RANKINGS = {
    "sft_shapley": f"{RUN}/sft/{MAIN}/shapley.csv",
    "finetune_shapley": f"{RUN}/finetune/{MAIN}/shapley.csv",
    "loo": f"{RUN}/sft/loo/shapley.csv",
    "banzhaf": f"{RUN}/sft/banzhaf/shapley.csv",
    **{method: f"{RUN}/baselines/{method}/values.csv" for method in config["evaluation"]["baselines"]},
}
# Multi-fidelity values need values from a prefix of the estimation plan, which only sampled estimators give.
MULTIFIDELITY = MAIN not in ("exact", "loo")
if MULTIFIDELITY:
    RANKINGS["multifidelity_shapley"] = f"{RUN}/evaluation/multifidelity/shapley.csv"
# Per ranking, the jobs (benchmark-file globs under {RUN}/benchmarks) whose wall time and peak memory it costs.
RANKING_JOBS = {
    "sft_shapley": [f"sft/{MAIN}/**/*.tsv"],
    "finetune_shapley": [f"finetune/{MAIN}/**/*.tsv"],
    "loo": ["sft/loo/**/*.tsv"],
    "banzhaf": ["sft/banzhaf/**/*.tsv"],
    "multifidelity_shapley": [f"sft/{MAIN}/**/*.tsv", "retrain/agreement/**/*.tsv", "evaluation/multifidelity.tsv"],
    **{method: [f"baselines/{method}.tsv", f"baselines/{method}/**/*.tsv"] for method in config["evaluation"]["baselines"]},
}


def ranking_values(wildcards):
    return RANKINGS


# Attribution baselines (baselines.smk)
BASELINE_DEFAULTS = {
    "dtrak": {"projection_dim": 256, "timesteps": 10, "lam": 1.0e-2, "target": "generated", "n_targets": 256,
              "batch_size": 32},
    "inrun": {"start": "full", "steps": 200, "batch_size": 64, "lr": 1.0e-2, "optimizer": "sgd",
              "validation_batch_size": 128},
    # Members train from scratch with the `train` recipe unless these keys override it (steps, batch_size, lr, ...).
    "ensembles": {"members": 8},
}
BASELINE_START = {"full": f"{RUN}/models/full", "recovered": f"{RUN}/models/recovered"}


wildcard_constraints:
    member=r"\d{2}",


def baseline_settings(method):
    return {**BASELINE_DEFAULTS[method], **config.get("baselines", {}).get(method, {})}


def inrun_options():
    return {key: value for key, value in baseline_settings("inrun").items() if key != "start"}


def inrun_start_model(wildcards):
    return BASELINE_START[baseline_settings("inrun")["start"]]


def ensemble_training():
    """The `train` recipe with config["baselines"]["ensembles"] overrides (all but `members`)."""
    overrides = {key: value for key, value in baseline_settings("ensembles").items() if key != "members"}
    return {**training_settings("train"), **overrides}


def ensemble_members(wildcards):
    count = baseline_settings("ensembles")["members"]
    return expand(f"{RUN}/baselines/ensembles/members/m{{member}}", member=[f"{m:02d}" for m in range(count)])


def generation_settings():
    """How the baselines generate: the coalitions' sampler, sample count and property."""
    u = config["utility"]
    return {key: u[key] for key in ("n_samples", "inference_steps", "sampler")}


def baseline_values():
    return expand(f"{RUN}/baselines/{{method}}/values.csv", method=list(BASELINE_DEFAULTS))
