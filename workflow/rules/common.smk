# Parse-time helpers: paths, the coalition plans (static, so `snakemake -n` lists every coalition job of the current
# round), the adaptive rounds, settings handed to the scripts, and resources scaled by attempt.
from functools import lru_cache
from pathlib import Path

from diffcredit import rounds, stages
from diffcredit.contributors import contributor_ids
from diffcredit.estimators import REGISTRY
from diffcredit.families import family_class

RUN = f"results/{config['name']}"
ENV = "../../envs/diffcredit.yaml"
from diffcredit.estimators import NAMES as ESTIMATORS  # the estimator registry

# Plans that are not estimators: held-out subsets for the LDS, and the estimation prefix that is also retrained.
EVALUATION_PLANS = ("lds", "agreement")
START_MODEL = {"sft": f"{RUN}/models/recovered", "finetune": f"{RUN}/models/full", "retrain": []}
# The model family (diffcredit.families): the config's model section and the folder rule prepare_family makes; None for
# the pixel family, which has nothing to prepare.
FAMILY = None if config["model"]["family"] == "pixel" else {"model": config["model"], "directory": f"{RUN}/family"}
FAMILY_INPUT = [] if FAMILY is None else FAMILY["directory"]


def local_files(*paths):
    """The files behind the local paths the config names (a file, or every file below a folder; None and paths that
    do not exist name none, and the stage reading them says what is missing): as inputs, replacing them reruns the
    stages that read them and everything after."""
    found = []
    for path in filter(None, paths):
        path = Path(path)
        found += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [str(p) for p in found]


def reference_files():
    """The files of the trusted reference (its image folder or arrays, its manifest), if the config names one."""
    reference = config["data"]["reference"] or {}
    return local_files(reference.get("path"), reference.get("manifest"))


def property_files():
    """The local files the property reads at scoring time (the aesthetic predictor)."""
    return local_files(config["utility"]["property_options"].get("predictor"))


def staged_family():
    """The staged base or autoencoder folder of the family (none when the workflow trains its stand-in)."""
    section = config["model"].get(config["model"]["family"]) or {}
    return local_files(section.get("base"), section.get("autoencoder"))


# The stages that run alone on the critical path (the family's preparation, training, recovery, the feature extractor)
# compute with two torch threads, 1.3-1.7x faster per step than one on these models (benchmarks/bench_threads.py); the
# coalition jobs keep one each and run side by side. The count reaches torch as a parameter because Snakemake lowers
# `threads` to --cores, and another thread count gives other bytes (README, "Reproducibility").
SOLO_THREADS = 2


wildcard_constraints:
    mode="sft|finetune|retrain",
    plan="|".join(ESTIMATORS + EVALUATION_PLANS),
    batch=r"b\d{5}",
    round=r"r\d\d+",


@lru_cache
def contributors():
    data = config["data"]
    return contributor_ids(data["source"], path=data["path"], manifest=data["manifest"])


def plan_spec(plan):
    """What determines the coalitions of `plan` (see diffcredit.stages.plan_table)."""
    main = config["estimator"]
    budget = (
        config["evaluation"]["banzhaf_budget"] if plan == "banzhaf" and main["name"] != "banzhaf" else main["budget"]
    )
    if plan == MAIN and ADAPTIVE:
        budget = round_sizes(plan)[-1]  # the plan of the last possible round; earlier rounds evaluate its prefixes
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
        "bound_repeats": main["bound_repeats"],
        "null_has_noise": family_class(config["model"]["family"]).null_has_noise,
    }


def plan_spec_of(wildcards):
    return plan_spec(wildcards.plan)


@lru_cache
def plan_table(plan):
    """The coalitions of `plan`, computed at parse time (deterministic from the seed; prefix-stable)."""
    return stages.plan_table(**plan_spec(plan))


# Adaptive budgets (diffcredit.rounds): the main estimator's plan is evaluated in rounds of growing prefixes, and a
# checkpoint after each round decides whether the next one exists.
MAIN = config["estimator"]["name"]
STOPPING = config["estimator"]["stopping"]
ADAPTIVE = STOPPING["rule"] != "none"
rounds.check_stopping(STOPPING, sampled=REGISTRY[MAIN].sampled, budget=config["estimator"]["budget"])


@lru_cache
def round_sizes(plan):
    """Coalitions evaluated by each round of `plan`: adaptive rounds for the main estimator, else one round."""
    if plan != MAIN or not ADAPTIVE:
        return (len(plan_table(plan)),)
    limit = 2 ** len(contributors())
    return tuple(
        rounds.round_sizes(config["estimator"]["budget"], STOPPING["round_budget"], STOPPING["max_budget"], limit)
    )


def round_id(index):
    return f"r{index:02d}"


@lru_cache
def batches(plan):
    """Plan rows of `plan` in jobs of `coalitions_per_job`, cut also where a round ends, so that every job belongs to
    one round and a larger budget or a new round only adds jobs. Each job: its round and its rows' columns."""
    table = plan_table(plan)
    size, ends = config["coalitions_per_job"], round_sizes(plan)
    cuts = sorted(set(range(0, len(table), size)) | set(ends[:-1]))
    columns = [name for name in ("coalition", "members", "repeats") if name in table]
    jobs = {}
    for index, (start, stop) in enumerate(zip(cuts, cuts[1:] + [len(table)])):
        rows = table.iloc[start:stop]
        jobs[f"b{index:05d}"] = (int(rounds.round_of(start + 1, ends)), {c: rows[c].tolist() for c in columns})
    return jobs


def batch_rows(wildcards):
    return batches(wildcards.plan)[wildcards.batch][1]


def batches_until(mode, plan, last_round):
    """The job tables of `plan` up to round `last_round`."""
    chosen = [batch for batch, (index, _) in batches(plan).items() if index <= last_round]
    return expand(f"{RUN}/{mode}/{plan}/batches/{{batch}}.tsv", batch=chosen)


def round_batch_files(wildcards):
    return batches_until(wildcards.mode, wildcards.plan, int(wildcards.round[1:]))


def adaptive(plan):
    return plan == MAIN and ADAPTIVE


def final_round(wildcards):
    """The round whose stopping decision ended the rounds of (mode, plan): each decision is a checkpoint."""
    if not adaptive(wildcards.plan):
        return 0
    for index in range(len(round_sizes(wildcards.plan))):
        decision = checkpoints.round_values.get(mode=wildcards.mode, plan=wildcards.plan, round=round_id(index))
        if rounds.read_decision(decision.output.decision).stop:
            return index
    raise ValueError(f"no stopping decision ended the rounds of {wildcards.plan}: the last round always stops")


def batch_files(wildcards):
    """The job tables of every round that ran."""
    return batches_until(wildcards.mode, wildcards.plan, final_round(wildcards))


def round_files(wildcards):
    """The adaptive rounds' values and stopping decisions (none without adaptive rounds)."""
    indices = [round_id(index) for index in range(final_round(wildcards) + 1)] if adaptive(wildcards.plan) else []
    rounds_dir = f"{RUN}/{wildcards.mode}/{wildcards.plan}/rounds"
    return {
        "round_values": expand(f"{rounds_dir}/{{round}}/values.csv", round=indices),
        "decisions": expand(f"{rounds_dir}/{{round}}/decision.json", round=indices),
    }


def round_params(wildcards):
    """What the round's checkpoint needs: its size, whether it is the last possible one, and the stopping rule."""
    index, sizes = int(wildcards.round[1:]), round_sizes(wildcards.plan)
    return {"round": index, "n_coalitions": sizes[index], "last": index == len(sizes) - 1, "stopping": STOPPING}


def previous_round_values(wildcards):
    index = int(wildcards.round[1:])
    return [] if index == 0 else f"{RUN}/{wildcards.mode}/{wildcards.plan}/rounds/{round_id(index - 1)}/values.csv"


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
    # utility.ema: fresh starts a new EMA of the start weights (step 0: diffusers' warm-up), continue carries the start
    # model's EMA on from the step count of the run that made it.
    averaged = not retrain and u["ema"] != "none" and t["ema_decay"] is not None
    continued = averaged and u["ema"] == "continue"
    start_steps = {"sft": config["recover"]["steps"], "finetune": t["steps"]}.get(mode, 0)
    return {
        "mode": mode,
        "steps": t["steps"] if retrain else u["finetune_steps"],
        "batch_size": t["batch_size"] if retrain else u["batch_size"],
        "lr": t["lr"] if retrain else u["lr"],
        "optimizer": t["optimizer"],
        "grad_clip": t["grad_clip"],
        "ema_decay": t["ema_decay"] if retrain or averaged else None,
        "ema_step": start_steps if continued else 0,
        "unet": config["model"]["unet"],
        "schedule": config["model"]["schedule"],
        "family": FAMILY,
        "property": u["property"],
        "property_options": u["property_options"],
        "n_samples": u["n_samples"],
        "inference_steps": u["inference_steps"],
        "sampler": u["sampler"],
        "sample_batch_size": u["sample_batch_size"],
        "precision": config["model"]["precision"],
        "seed": config["seed"],
    }


KEEP = [what for what, wanted in config["keep"].items() if wanted]


def keep_dir(wildcards):
    return f"{RUN}/{wildcards.mode}/{wildcards.plan}/kept"


def training_settings(section):
    """The recipe of `section` (train or recover, each complete in the schema) and the run's precision."""
    keys = ("steps", "batch_size", "lr", "optimizer", "ema_decay", "grad_clip")
    return {**{key: config[section][key] for key in keys}, "precision": config["model"]["precision"]}


def minutes(base):
    """Runtime in minutes for attempt 1, doubled on each retry."""

    def runtime(wildcards, attempt):
        return base * 2 ** (attempt - 1)

    return runtime


def memory(base_mb):
    def mem_mb(wildcards, attempt):
        return base_mb * attempt

    return mem_mb


VALUE_FILES = ("values.csv", "convergence.tsv", "rounds.tsv", "values.png", "convergence.png")


def values_of(mode, plan):
    return [f"{RUN}/{mode}/{plan}/{name}" for name in VALUE_FILES]


def value_kind(wildcards):
    """What the plan's values are ("Shapley", "Banzhaf", "leave-one-out"), for the figures' captions."""
    return REGISTRY[wildcards.plan].values


def default_targets():
    main = values_of(config["utility"]["mode"], config["estimator"]["name"])
    return main + [f"{RUN}/figures/samples.png", f"{RUN}/bundle/SHA256SUMS", *REPORT_PAGES.values()]


# Pages of `snakemake --report` (aggregate.smk): the values with their intervals, the cost of each stage, the config.
REPORT_PAGES = {name: f"{RUN}/report/{name}.html" for name in ("values", "costs", "config")}


def benchmark_patterns(wildcards):
    """Rule name -> its benchmark file pattern, for the cost table (wildcards become globs there)."""
    return {rule.name: str(rule.benchmark) for rule in workflow.rules if rule.benchmark is not None}


def bundle_files(wildcards):
    """Name in the bundle -> produced file, for everything a reader needs to check the values."""
    mode, plan = config["utility"]["mode"], config["estimator"]["name"]
    files = {
        "contributors.tsv": f"{RUN}/data/contributors.tsv",
        "coalitions.tsv": f"{RUN}/plans/{plan}.tsv",
        "utilities.tsv": f"{RUN}/{mode}/{plan}/utilities.tsv",
        "samples.png": f"{RUN}/figures/samples.png",
    }
    for name in VALUE_FILES:
        files[name] = f"{RUN}/{mode}/{plan}/{name}"
    for stage in ("full", "pruned", "recovered"):
        files[f"models/{stage}.json"] = f"{RUN}/models/{stage}.json"
    return files


# Rankings compared by the LDS and counterfactuals (evaluate.smk): name -> values table. The main estimator's values
# are called "shapley" whatever the estimator, so the report's keys stay stable (lds_sft_shapley, lds_loo, ...).
RANKINGS = {
    "sft_shapley": f"{RUN}/sft/{MAIN}/values.csv",
    "finetune_shapley": f"{RUN}/finetune/{MAIN}/values.csv",
    "loo": f"{RUN}/sft/loo/values.csv",
    "banzhaf": f"{RUN}/sft/banzhaf/values.csv",
    **{method: f"{RUN}/baselines/{method}/values.csv" for method in config["evaluation"]["baselines"]},
}
# Multi-fidelity values need values from a prefix of the estimation plan, which only sampled estimators give.
MULTIFIDELITY = MAIN not in ("exact", "loo")
if MULTIFIDELITY:
    RANKINGS["multifidelity_shapley"] = f"{RUN}/evaluation/multifidelity/values.csv"


# The counterfactual's rows: the full-data baseline, every ranking, and the seeded random control.
from diffcredit.fidelity import COUNTERFACTUAL_FULL, COUNTERFACTUAL_RANDOM

COUNTERFACTUAL_ROWS = [COUNTERFACTUAL_FULL, *RANKINGS, COUNTERFACTUAL_RANDOM]


wildcard_constraints:
    ranking="|".join(COUNTERFACTUAL_ROWS),


def counterfactual_values(wildcards):
    """The values a counterfactual row removes the top of: none for the baseline and the random control."""
    return RANKINGS.get(wildcards.ranking, [])


def ranking_jobs():
    """Per ranking, the jobs (benchmark-file globs under {RUN}/benchmarks) whose wall time and peak memory it costs."""
    jobs = {
        "sft_shapley": [f"sft/{MAIN}/**/*.tsv"],
        "finetune_shapley": [f"finetune/{MAIN}/**/*.tsv"],
        "loo": ["sft/loo/**/*.tsv"],
        "banzhaf": ["sft/banzhaf/**/*.tsv"],
        "retrain_shapley": ["retrain/agreement/**/*.tsv"],  # computed by the report from the agreement runs
        "multifidelity_shapley": [f"sft/{MAIN}/**/*.tsv", "retrain/agreement/**/*.tsv", "evaluation/multifidelity.tsv"],
    }
    for method in config["evaluation"]["baselines"]:
        own = [f"baselines/{method}.tsv"]
        if method in TRAK_FAMILY:  # the feature job its scores are computed from
            own.append(f"baselines/trak_features/{TRAK_FAMILY[method]}.tsv")
        if method in INRUN_METHODS and INRUN_IN_TRAIN_FULL:  # accumulated inside the training run
            own.append("train_full.tsv")
        if method in ENSEMBLE_METHODS:
            own = ["baselines/ensemble_codes.tsv", "baselines/ensembles.tsv", "baselines/ensembles/*.tsv"]
        jobs[method] = own
    return jobs


# Attribution baselines (baselines.smk); their settings are config["baselines"] (defaults: the schema).
# The TRAK family: method -> the output function of its training features (diffcredit.attribution.trak.METHODS).
TRAK_FAMILY = {
    "trak": "loss",
    "dtrak": "squared_norm",
    "journey_trak": "loss",
    "relative_influence": "loss",
    "renormalized_influence": "loss",
    "gradient_similarity": "loss",
}
SIMILARITY = ("pixel_similarity_mean", "pixel_similarity_max", "embedding_similarity_mean", "embedding_similarity_max")
HEURISTICS = ("aesthetic_mean", "aesthetic_max", "embedding_distance")
INRUN_METHODS = ("inrun", "inrun_first_order")
ENSEMBLE_METHODS = ("ensembles", "ensembles_contrast")
# In-Run Data Shapley accumulates during train_full itself, or during a replay of its run (baselines.smk).
INRUN_IN_TRAIN_FULL = config["baselines"]["inrun"]["during"] == "train_full"
INRUN_VALUES = {method: f"{RUN}/baselines/{method}/values.csv" for method in INRUN_METHODS}


wildcard_constraints:
    member=r"\d{2}",
    trak_method="|".join(TRAK_FAMILY),
    trak_output="loss|squared_norm",
    similarity="|".join(SIMILARITY),
    heuristic="|".join(HEURISTICS),


def baseline_settings(method):
    return config["baselines"][method]


def trak_features(wildcards):
    return f"{RUN}/baselines/trak_features/{TRAK_FAMILY[wildcards.trak_method]}.npz"


def trak_feature_settings():
    return {key: value for key, value in baseline_settings("trak").items() if key not in ("lam", "aggregate")}


def inrun_settings():
    return {key: baseline_settings("inrun")[key] for key in ("order", "validation_batch_size")}


def inrun_during_training():
    """What train_full needs to accumulate In-Run Data Shapley (None: it does not)."""
    if not INRUN_IN_TRAIN_FULL:
        return None
    return {
        "heldout_data": f"{RUN}/data/heldout.npz",
        "out": INRUN_VALUES["inrun"],
        "first_order_out": INRUN_VALUES["inrun_first_order"],
        **inrun_settings(),
    }


def heuristic_predictor():
    """The aesthetic predictor of the heuristics: their own, else the aesthetic property's."""
    return baseline_settings("heuristics")["predictor"] or config["utility"]["property_options"].get("predictor")


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
    """Every baseline's values (`snakemake baselines`); the aesthetic heuristics only with a predictor."""
    methods = [*TRAK_FAMILY, *INRUN_METHODS, *SIMILARITY, *HEURISTICS, "add_one_in", *ENSEMBLE_METHODS]
    if heuristic_predictor() is None:
        methods = [m for m in methods if not m.startswith("aesthetic")]
    return expand(f"{RUN}/baselines/{{method}}/values.csv", method=methods)


# The yardstick is decided before any job runs: a config that declares itself a marketplace must name a trusted
# reference (data.reference), and every reference-based property of the run is measured against it.
from diffcredit.contributors import TRUSTED, yardstick

YARDSTICK = yardstick(config["data"]["reference"], marketplace=config["marketplace"])


def reference_training_data(wildcards):
    """The contributors' items train the extractor only without a trusted reference (then it never sees them)."""
    return [] if YARDSTICK == TRUSTED else rules.prepare_data.output.train
