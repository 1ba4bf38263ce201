rule aggregate:
    input:
        plan=f"{RUN}/plans/{{plan}}.tsv",
        utilities=f"{RUN}/{{mode}}/{{plan}}/utilities.tsv",
        contributors=rules.prepare_data.output.contributors,
    output:
        values=f"{RUN}/{{mode}}/{{plan}}/shapley.csv",
        convergence=f"{RUN}/{{mode}}/{{plan}}/convergence.tsv",
        figure=report(f"{RUN}/{{mode}}/{{plan}}/shapley.png", caption="../report/shapley.rst", category="Values"),
    params:
        confidence=config["estimator"]["confidence"],
    log:
        f"{RUN}/logs/{{mode}}/{{plan}}/aggregate.log",
    benchmark:
        f"{RUN}/benchmarks/{{mode}}/{{plan}}/aggregate.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(4000),
    script:
        "../scripts/aggregate.py"


rule sample_figure:
    input:
        heldout=rules.prepare_data.output.heldout,
        full=rules.train_full.output.model,
        recovered=rules.recover.output.model,
        utilities=f"{RUN}/{config['utility']['mode']}/{config['estimator']['name']}/utilities.tsv",
        plan=f"{RUN}/plans/{config['estimator']['name']}.tsv",
    output:
        report(f"{RUN}/figures/samples.png", caption="../report/samples.rst", category="Samples"),
    params:
        store=f"{RUN}/{config['utility']['mode']}/store",
        schedule=config["model"]["schedule"],
        inference_steps=config["utility"]["inference_steps"],
        seed=config["seed"],
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
    script:
        "../scripts/sample_figure.py"
