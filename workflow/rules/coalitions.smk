rule plan:
    input:
        contributors=rules.prepare_data.output.contributors,
    output:
        f"{RUN}/plans/{{plan}}.tsv",
    log:
        f"{RUN}/logs/plan/{{plan}}.log",
    benchmark:
        f"{RUN}/benchmarks/plan/{{plan}}.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    params:
        spec=plan_spec_of,
    script:
        "../scripts/plan.py"


# One job measures `coalitions_per_job` plan rows (fine-tune -> sample -> score each) in one process, so the ~11 s of
# imports is paid once per job; each finished coalition is stored at once and never recomputed. The rows travel as
# params, not through the plan file, so a larger budget or a new round leaves the finished jobs alone.
rule coalition_utilities:
    input:
        train=rules.prepare_data.output.train,
        reference=rules.reference.output[0],
        start_model=start_model,
        family=FAMILY_INPUT,
        scoring=property_files(),
    output:
        f"{RUN}/{{mode}}/{{plan}}/batches/{{batch}}.tsv",
    log:
        f"{RUN}/logs/{{mode}}/{{plan}}/{{batch}}.log",
    benchmark:
        f"{RUN}/benchmarks/{{mode}}/{{plan}}/{{batch}}.tsv"
    group:
        "coalitions"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(60),
        mem_mb=memory(4000),
        gpu=1,
    params:
        batch=batch_rows,
        repeats=repeats,
        settings=utility_settings,
        store=f"{RUN}/{{mode}}/store",
        keep=KEEP,
        keep_dir=keep_dir,
    script:
        "../scripts/coalition_utilities.py"


rule collect_utilities:
    input:
        batch_files,
    output:
        f"{RUN}/{{mode}}/{{plan}}/utilities.tsv",
    log:
        f"{RUN}/logs/{{mode}}/{{plan}}/collect_utilities.log",
    benchmark:
        f"{RUN}/benchmarks/{{mode}}/{{plan}}/collect_utilities.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    script:
        "../scripts/collect_utilities.py"


# Adaptive rounds (estimator.stopping): the utilities measured up to a round, and the checkpoint that aggregates them
# and decides whether the next round (its coalition jobs) exists. `snakemake -n` lists the jobs of the current round.
rule collect_round:
    input:
        round_batch_files,
    output:
        f"{RUN}/{{mode}}/{{plan}}/rounds/{{round}}/utilities.tsv",
    log:
        f"{RUN}/logs/{{mode}}/{{plan}}/rounds/{{round}}/collect.log",
    benchmark:
        f"{RUN}/benchmarks/{{mode}}/{{plan}}/rounds/{{round}}/collect.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    script:
        "../scripts/collect_utilities.py"


checkpoint round_values:
    input:
        plan=f"{RUN}/plans/{{plan}}.tsv",
        utilities=f"{RUN}/{{mode}}/{{plan}}/rounds/{{round}}/utilities.tsv",
        contributors=rules.prepare_data.output.contributors,
        previous=previous_round_values,
    output:
        values=f"{RUN}/{{mode}}/{{plan}}/rounds/{{round}}/values.csv",
        decision=f"{RUN}/{{mode}}/{{plan}}/rounds/{{round}}/decision.json",
    log:
        f"{RUN}/logs/{{mode}}/{{plan}}/rounds/{{round}}/values.log",
    benchmark:
        f"{RUN}/benchmarks/{{mode}}/{{plan}}/rounds/{{round}}/values.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(4000),
    params:
        round=round_params,
        confidence=config["estimator"]["confidence"],
    script:
        "../scripts/round_values.py"
