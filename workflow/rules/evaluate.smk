# `snakemake evaluate`: fidelity of the credited values against retraining from scratch (slow: it retrains): the LDS
# per alpha, the budget-matched comparison, multi-fidelity values, counterfactuals, every method's cost.


# One job per ranking (and the full-data baseline and the random control): each retrains without its top contributors
# over the training seeds, so a cluster runs them side by side; the shared store measures a removal set once.
rule counterfactual_runs:
    input:
        values=counterfactual_values,
        train=rules.prepare_data.output.train,
        reference=rules.reference.output[0],
        family=FAMILY_INPUT,
        scoring=property_files(),
    output:
        f"{RUN}/evaluation/counterfactual/{{ranking}}.tsv",
    log:
        f"{RUN}/logs/evaluation/counterfactual/{{ranking}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluation/counterfactual/{{ranking}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(240),
        mem_mb=memory(4000),
        gpu=1,
    params:
        fraction=config["evaluation"]["counterfactual_fraction"],
        repeats=config["evaluation"]["seeds"],
        settings=settings_of("retrain"),
        store=f"{RUN}/retrain/store",
    script:
        "../scripts/counterfactual_runs.py"


rule counterfactual:
    input:
        expand(f"{RUN}/evaluation/counterfactual/{{ranking}}.tsv", ranking=COUNTERFACTUAL_ROWS),
    output:
        f"{RUN}/evaluation/counterfactual.tsv",
    log:
        f"{RUN}/logs/evaluation/counterfactual.log",
    benchmark:
        f"{RUN}/benchmarks/evaluation/counterfactual.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    script:
        "../scripts/counterfactual.py"


rule multifidelity:
    input:
        contributors=rules.prepare_data.output.contributors,
        cheap_plan=f"{RUN}/plans/{MAIN}.tsv",
        cheap=f"{RUN}/sft/{MAIN}/utilities.tsv",
        retrained_plan=f"{RUN}/plans/agreement.tsv",
        retrained=f"{RUN}/retrain/agreement/utilities.tsv",
    output:
        values=f"{RUN}/evaluation/multifidelity/values.csv",
        summary=f"{RUN}/evaluation/multifidelity/summary.json",
    log:
        f"{RUN}/logs/evaluation/multifidelity.log",
    benchmark:
        f"{RUN}/benchmarks/evaluation/multifidelity.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    params:
        confidence=config["estimator"]["confidence"],
    script:
        "../scripts/multifidelity.py"


rule evaluation_report:
    input:
        **RANKINGS,
        contributors=rules.prepare_data.output.contributors,
        lds_plan=f"{RUN}/plans/lds.tsv",
        lds_retrain=f"{RUN}/retrain/lds/utilities.tsv",
        agreement_plan=f"{RUN}/plans/agreement.tsv",
        agreement_retrain=f"{RUN}/retrain/agreement/utilities.tsv",
        agreement_sft=f"{RUN}/sft/agreement/utilities.tsv",
        agreement_finetune=f"{RUN}/finetune/agreement/utilities.tsv",
        estimation_plan=f"{RUN}/plans/{MAIN}.tsv",
        estimation_sft=f"{RUN}/sft/{MAIN}/utilities.tsv",
        estimation_finetune=f"{RUN}/finetune/{MAIN}/utilities.tsv",
        multifidelity=rules.multifidelity.output.summary if MULTIFIDELITY else [],
        counterfactual=rules.counterfactual.output[0],
    output:
        report=f"{RUN}/evaluation/report.json",
        lds=f"{RUN}/evaluation/lds.tsv",
        methods=f"{RUN}/evaluation/methods.tsv",
        methods_figure=f"{RUN}/evaluation/methods.png",
        budget=f"{RUN}/evaluation/budget.tsv",
        budget_figure=f"{RUN}/evaluation/budget.png",
    log:
        f"{RUN}/logs/evaluation/report.log",
    benchmark:
        f"{RUN}/benchmarks/evaluation/report.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(30),
        mem_mb=memory(2000),
    params:
        rankings=list(RANKINGS),
        alpha=config["evaluation"]["alpha"],
        jobs=ranking_jobs(),
        confidence=config["estimator"]["confidence"],
        benchmarks=f"{RUN}/benchmarks",
    script:
        "../scripts/evaluation_report.py"


rule evaluate:
    input:
        rules.evaluation_report.output,
