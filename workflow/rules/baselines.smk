# Non-Shapley attribution baselines, each written as {RUN}/baselines/<method>/values.csv (contributor, value, ...,
# the layout of values.csv) for the LDS and counterfactual evaluations. One rule per method family: the TRAK family
# (one feature job per output function, one scoring job per method), In-Run Data Shapley, similarity, the paper's
# heuristics, add-one-in and encoded ensembles. Settings: config["baselines"] (defaults and documentation: the
# schema and config/README.md); method lists: common.smk.


rule baselines:
    input:
        baseline_values(),


# Projected per-item gradients of the training items and the targets (the loss features also carry Journey-TRAK's
# trajectory features); the projection is streamed, so memory does not grow with parameters x k.
rule trak_features:
    input:
        model=rules.train_full.output.model,
        train=rules.prepare_data.output.train,
        heldout=rules.prepare_data.output.heldout,
        family=FAMILY_INPUT,
    output:
        f"{RUN}/baselines/trak_features/{{trak_output}}.npz",
    log:
        f"{RUN}/logs/baselines/trak_features/{{trak_output}}.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/trak_features/{{trak_output}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(120),
        mem_mb=memory(16000),
        gpu=1,
    params:
        settings=trak_feature_settings(),
        family=FAMILY,
        inference_steps=config["utility"]["inference_steps"],
        sampler=config["utility"]["sampler"],
        schedule=config["model"]["schedule"],
        seed=config["seed"],
    script:
        "../scripts/baseline_trak_features.py"


rule baseline_trak:
    input:
        features=trak_features,
        train=rules.prepare_data.output.train,
    output:
        f"{RUN}/baselines/{{trak_method}}/values.csv",
    log:
        f"{RUN}/logs/baselines/{{trak_method}}.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/{{trak_method}}.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(4000),
    params:
        lam=baseline_settings("trak")["lam"],
        aggregate=baseline_settings("trak")["aggregate"],
    script:
        "../scripts/baseline_trak.py"


# In-Run Data Shapley belongs to the run that trained the full model: with baselines.inrun.during: train_full that
# run writes the values itself (model.smk); otherwise this rule replays the run (same seeds and recipe, checked
# against the saved model) with the accumulation on, so the default run's train_full stays as cheap as before.
if not INRUN_IN_TRAIN_FULL:

    rule baseline_inrun:
        input:
            model=rules.train_full.output.model,
            train=rules.prepare_data.output.train,
            heldout=rules.prepare_data.output.heldout,
            family=FAMILY_INPUT,
        output:
            **INRUN_VALUES,
        log:
            f"{RUN}/logs/baselines/inrun.log",
        benchmark:
            f"{RUN}/benchmarks/baselines/inrun.tsv"
        conda:
            ENV
        threads: 1
        resources:
            runtime=minutes(240),
            mem_mb=memory(8000),
            gpu=1,
        params:
            training=training_settings("train"),
            settings=inrun_settings(),
            unet=config["model"]["unet"],
            schedule=config["model"]["schedule"],
            family=FAMILY,
            seed=config["seed"],
        script:
            "../scripts/baseline_inrun.py"


rule baseline_similarity:
    input:
        model=rules.train_full.output.model,
        train=rules.prepare_data.output.train,
        heldout=rules.prepare_data.output.heldout,
        reference=rules.reference.output[0],
        family=FAMILY_INPUT,
    output:
        f"{RUN}/baselines/{{similarity}}/values.csv",
    log:
        f"{RUN}/logs/baselines/{{similarity}}.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/{{similarity}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(30),
        mem_mb=memory(8000),
        gpu=1,
    params:
        settings=baseline_settings("similarity"),
        family=FAMILY,
        inference_steps=config["utility"]["inference_steps"],
        sampler=config["utility"]["sampler"],
        schedule=config["model"]["schedule"],
        seed=config["seed"],
    script:
        "../scripts/baseline_similarity.py"


rule baseline_heuristic:
    input:
        train=rules.prepare_data.output.train,
        reference=rules.reference.output[0],
        predictor=local_files(heuristic_predictor()),
    output:
        f"{RUN}/baselines/{{heuristic}}/values.csv",
    log:
        f"{RUN}/logs/baselines/{{heuristic}}.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/{{heuristic}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(30),
        mem_mb=memory(8000),
        gpu=1,
    params:
        predictor=heuristic_predictor(),
    script:
        "../scripts/baseline_heuristic.py"


# v({i}) - v(∅) over training seeds, through the run's utility mode and store (singletons measured by an estimator
# are reused, and add-one-in's are reused by later plans).
rule baseline_add_one_in:
    input:
        train=rules.prepare_data.output.train,
        reference=rules.reference.output[0],
        start=START_MODEL[config["utility"]["mode"]],
        family=FAMILY_INPUT,
        scoring=property_files(),
    output:
        f"{RUN}/baselines/add_one_in/values.csv",
    log:
        f"{RUN}/logs/baselines/add_one_in.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/add_one_in.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(480),
        mem_mb=memory(8000),
        gpu=1,
    params:
        settings=settings_of(config["utility"]["mode"]),
        repeats=baseline_settings("add_one_in")["repeats"],
        store=f"{RUN}/{config['utility']['mode']}/store",
        confidence=config["estimator"]["confidence"],
    script:
        "../scripts/baseline_add_one_in.py"


rule ensemble_codes:
    input:
        contributors=rules.prepare_data.output.contributors,
    output:
        f"{RUN}/baselines/ensembles/codes.tsv",
    log:
        f"{RUN}/logs/baselines/ensemble_codes.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/ensemble_codes.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    params:
        members=baseline_settings("ensembles")["members"],
        seed=config["seed"],
    script:
        "../scripts/baseline_ensemble_codes.py"


# One job per member: each trains from scratch on about half of the contributors.
rule ensemble_member:
    input:
        codes=rules.ensemble_codes.output[0],
        train=rules.prepare_data.output.train,
        family=FAMILY_INPUT,
    output:
        directory(f"{RUN}/baselines/ensembles/members/m{{member}}"),
    log:
        f"{RUN}/logs/baselines/ensembles/m{{member}}.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/ensembles/m{{member}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(120),
        mem_mb=memory(8000),
        gpu=1,
    params:
        training=ensemble_training(),
        unet=config["model"]["unet"],
        schedule=config["model"]["schedule"],
        family=FAMILY,
        seed=config["seed"],
    script:
        "../scripts/baseline_ensemble_member.py"


# The leave-one-out ablation (M members against M/2) and the size-matched contrast (M/2 with against M/2 without).
rule baseline_ensembles:
    input:
        codes=rules.ensemble_codes.output[0],
        members=ensemble_members,
        train=rules.prepare_data.output.train,
        reference=rules.reference.output[0],
        family=FAMILY_INPUT,
    output:
        ensembles=f"{RUN}/baselines/ensembles/values.csv",
        contrast=f"{RUN}/baselines/ensembles_contrast/values.csv",
    log:
        f"{RUN}/logs/baselines/ensembles.log",
    benchmark:
        f"{RUN}/benchmarks/baselines/ensembles.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(60),
        mem_mb=memory(8000),
        gpu=1,
    params:
        generation=generation_settings(),
        property=config["utility"]["property"],
        property_options=config["utility"]["property_options"],
        schedule=config["model"]["schedule"],
        family=FAMILY,
        seed=config["seed"],
    script:
        "../scripts/baseline_ensembles.py"
