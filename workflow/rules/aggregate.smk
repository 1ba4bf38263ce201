rule aggregate:
    input:
        unpack(round_files),
        plan=f"{RUN}/plans/{{plan}}.tsv",
        utilities=f"{RUN}/{{mode}}/{{plan}}/utilities.tsv",
        contributors=rules.prepare_data.output.contributors,
    output:
        values=f"{RUN}/{{mode}}/{{plan}}/values.csv",
        convergence=f"{RUN}/{{mode}}/{{plan}}/convergence.tsv",
        rounds=f"{RUN}/{{mode}}/{{plan}}/rounds.tsv",
        figure=report(f"{RUN}/{{mode}}/{{plan}}/values.png", caption="../report/values.rst", category="Values"),
        convergence_figure=report(
            f"{RUN}/{{mode}}/{{plan}}/convergence.png", caption="../report/convergence.rst", category="Values"
        ),
    log:
        f"{RUN}/logs/{{mode}}/{{plan}}/aggregate.log",
    benchmark:
        f"{RUN}/benchmarks/{{mode}}/{{plan}}/aggregate.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(4000),
    params:
        confidence=config["estimator"]["confidence"],
        kind=value_kind,
    script:
        "../scripts/aggregate.py"


rule sample_figure:
    input:
        heldout=rules.prepare_data.output.heldout,
        full=rules.train_full.output.model,
        recovered=rules.recover.output.model,
        family=FAMILY_INPUT,
        utilities=f"{RUN}/{config['utility']['mode']}/{config['estimator']['name']}/utilities.tsv",
        plan=f"{RUN}/plans/{config['estimator']['name']}.tsv",
    output:
        report(f"{RUN}/figures/samples.png", caption="../report/samples.rst", category="Samples"),
    log:
        f"{RUN}/logs/sample_figure.log",
    benchmark:
        f"{RUN}/benchmarks/sample_figure.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(10),
        mem_mb=memory(4000),
    params:
        store=f"{RUN}/{config['utility']['mode']}/store",
        schedule=config["model"]["schedule"],
        family=FAMILY,
        inference_steps=config["utility"]["inference_steps"],
        sampler=config["utility"]["sampler"],
        seed=config["seed"],
    script:
        "../scripts/sample_figure.py"


# The report's pages (`snakemake --report`): the main values with their intervals, the cost of every stage from the
# benchmark files, and the configuration. It runs last: its inputs are the default target's other products.
rule report_pages:
    input:
        values=f"{RUN}/{config['utility']['mode']}/{MAIN}/values.csv",
        rounds=f"{RUN}/{config['utility']['mode']}/{MAIN}/rounds.tsv",
        samples=rules.sample_figure.output[0],
        bundle=f"{RUN}/bundle/SHA256SUMS",
        reference=rules.reference.output[0],
    output:
        values=report(REPORT_PAGES["values"], caption="../report/values_table.rst", category="Values"),
        costs=report(REPORT_PAGES["costs"], caption="../report/costs.rst", category="Cost"),
        config=report(REPORT_PAGES["config"], caption="../report/config.rst", category="Configuration"),
    log:
        f"{RUN}/logs/report_pages.log",
    benchmark:
        f"{RUN}/benchmarks/report_pages.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    params:
        kind=REGISTRY[MAIN].values,
        estimator=MAIN,
        confidence=config["estimator"]["confidence"],
        benchmarks=benchmark_patterns,
    script:
        "../scripts/report_pages.py"
