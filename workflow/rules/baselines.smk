# Non-Shapley attribution baselines, each written as {RUN}/baselines/<method>/values.csv (contributor, value, ...),
# the layout of shapley.csv, for the LDS and counterfactual evaluations: D-TRAK, In-Run Data Shapley, encoded
# ensembles. Settings: config["baselines"][<method>] over BASELINE_DEFAULTS (common.smk).


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
    threads: 1
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
    threads: 1
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
    threads: 1
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
    threads: 1
    resources:
        runtime=minutes(60),
        mem_mb=memory(8000),
        gpu=1,
    script:
        "../scripts/baseline_ensembles.py"
