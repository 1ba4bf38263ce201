rule prepare_data:
    output:
        train=f"{RUN}/data/train.npz",
        heldout=f"{RUN}/data/heldout.npz",
        contributors=f"{RUN}/data/contributors.tsv",
    params:
        data=config["data"],
        seed=config["seed"],
    log:
        f"{RUN}/logs/prepare_data.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_data.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(4000),
    script:
        "../scripts/prepare_data.py"


rule reference:
    input:
        train=rules.prepare_data.output.train,
        heldout=rules.prepare_data.output.heldout,
    output:
        directory(f"{RUN}/reference"),
    params:
        features=config["features"],
        seed=config["seed"],
    log:
        f"{RUN}/logs/reference.log",
    benchmark:
        f"{RUN}/benchmarks/reference.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(20),
        mem_mb=memory(4000),
    script:
        "../scripts/reference.py"
