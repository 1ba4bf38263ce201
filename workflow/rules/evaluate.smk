# `snakemake evaluate`: fidelity of the credited values against retraining from scratch (slow: it retrains).


rule counterfactual:
    input:
        unpack(ranking_values),
        train=rules.prepare_data.output.train,
        reference=rules.reference.output[0],
    output:
        f"{RUN}/evaluation/counterfactual.tsv",
    params:
        fraction=config["evaluation"]["counterfactual_fraction"],
        repeats=config["evaluation"]["seeds"],
        settings=settings_of("retrain"),
        store=f"{RUN}/retrain/store",
        rankings=list(RANKINGS),
    log:
        f"{RUN}/logs/evaluation/counterfactual.log",
    benchmark:
        f"{RUN}/benchmarks/evaluation/counterfactual.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(240),
        mem_mb=memory(4000),
        gpu=1,
    script:
        "../scripts/counterfactual.py"


rule evaluation_report:
    input:
        unpack(ranking_values),
        lds_plan=f"{RUN}/plans/lds.tsv",
        lds_retrain=f"{RUN}/retrain/lds/utilities.tsv",
        agreement_plan=f"{RUN}/plans/agreement.tsv",
        agreement_retrain=f"{RUN}/retrain/agreement/utilities.tsv",
        agreement_sft=f"{RUN}/sft/agreement/utilities.tsv",
        agreement_finetune=f"{RUN}/finetune/agreement/utilities.tsv",
        counterfactual=rules.counterfactual.output[0],
    output:
        report=f"{RUN}/evaluation/report.json",
        lds=f"{RUN}/evaluation/lds.tsv",
    params:
        rankings=list(RANKINGS),
        confidence=config["estimator"]["confidence"],
        benchmarks=f"{RUN}/benchmarks",
    log:
        f"{RUN}/logs/evaluation/report.log",
    benchmark:
        f"{RUN}/benchmarks/evaluation/report.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(2000),
    script:
        "../scripts/evaluation_report.py"


rule evaluate:
    input:
        rules.evaluation_report.output,
