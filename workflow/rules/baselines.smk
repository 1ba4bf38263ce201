# Non-Shapley attribution baselines, each written as {RUN}/baselines/<method>/values.csv (contributor, value, ...), the
# layout of shapley.csv, for the LDS and counterfactual evaluations: D-TRAK, In-Run Data Shapley, encoded ensembles.
# Settings: config["baselines"][<method>] over the defaults below.
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


rule baselines:
    input:
        baseline_values(),


rule baseline_dtrak:
    input:
        model=rules.train_full.output.model,
        train=rules.prepare_data.output.train,
        heldout=rules.prepare_data.output.heldout,
    output:
        f"{RUN}/baselines/dtrak/values.csv",
    params:
        settings=baseline_settings("dtrak"),
        inference_steps=config["utility"]["inference_steps"],
        sampler=config["utility"]["sampler"],
        schedule=config["model"]["schedule"],
        seed=config["seed"],
    log:
        f"{RUN}/logs/baselines/dtrak.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/dtrak.tsv"
    conda:
        ENV
    threads: 2
    resources:
        runtime=minutes(60),
        mem_mb=memory(8000),
        gpu=1,
    script:
        "../scripts/baseline_dtrak.py"


rule baseline_inrun:
    input:
        model=inrun_start_model,
        train=rules.prepare_data.output.train,
        heldout=rules.prepare_data.output.heldout,
    output:
        f"{RUN}/baselines/inrun/values.csv",
    params:
        settings=inrun_options(),
        schedule=config["model"]["schedule"],
        seed=config["seed"],
    log:
        f"{RUN}/logs/baselines/inrun.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/inrun.tsv"
    conda:
        ENV
    threads: 2
    resources:
        runtime=minutes(60),
        mem_mb=memory(4000),
        gpu=1,
    script:
        "../scripts/baseline_inrun.py"


rule ensemble_codes:
    input:
        contributors=rules.prepare_data.output.contributors,
    output:
        f"{RUN}/baselines/ensembles/codes.tsv",
    params:
        members=baseline_settings("ensembles")["members"],
        seed=config["seed"],
    log:
        f"{RUN}/logs/baselines/ensemble_codes.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/ensemble_codes.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    script:
        "../scripts/baseline_ensemble_codes.py"


# One job per member: each trains from scratch on about half of the contributors.
rule ensemble_member:
    input:
        codes=rules.ensemble_codes.output[0],
        train=rules.prepare_data.output.train,
    output:
        directory(f"{RUN}/baselines/ensembles/members/m{{member}}"),
    params:
        training=ensemble_training(),
        unet=config["model"]["unet"],
        schedule=config["model"]["schedule"],
        seed=config["seed"],
    log:
        f"{RUN}/logs/baselines/ensembles/m{{member}}.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/ensembles/m{{member}}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        runtime=minutes(120),
        mem_mb=memory(8000),
        gpu=1,
    script:
        "../scripts/baseline_ensemble_member.py"


rule baseline_ensembles:
    input:
        codes=rules.ensemble_codes.output[0],
        members=ensemble_members,
        reference=rules.reference.output[0],
    output:
        f"{RUN}/baselines/ensembles/values.csv",
    params:
        generation=generation_settings(),
        property=config["utility"]["property"],
        property_options=config["utility"]["property_options"],
        schedule=config["model"]["schedule"],
        seed=config["seed"],
    log:
        f"{RUN}/logs/baselines/ensembles.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/ensembles.tsv"
    conda:
        ENV
    threads: 2
    resources:
        runtime=minutes(60),
        mem_mb=memory(8000),
        gpu=1,
    script:
        "../scripts/baseline_ensembles.py"
