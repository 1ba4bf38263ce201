rule prepare_data:
    input:
        local_files(config["data"]["path"], config["data"]["manifest"]),
    output:
        train=f"{RUN}/data/train.npz",
        heldout=f"{RUN}/data/heldout.npz",
        contributors=f"{RUN}/data/contributors.tsv",
    log:
        f"{RUN}/logs/prepare_data.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_data.tsv"
    conda:
        ENV
    resources:
        runtime=minutes(10),
        mem_mb=memory(4000),
    params:
        data=config["data"],
        marketplace=config["marketplace"],
        seed=config["seed"],
    script:
        "../scripts/prepare_data.py"


rule reference:
    input:
        train=reference_training_data,
        heldout=rules.prepare_data.output.heldout,
        staged=local_files(config["features"]["extractor"]) + reference_files(),
    output:
        directory(f"{RUN}/reference"),
    log:
        f"{RUN}/logs/reference.log",
    benchmark:
        f"{RUN}/benchmarks/reference.tsv"
    conda:
        ENV
    threads: SOLO_THREADS
    resources:
        runtime=minutes(20),
        mem_mb=memory(4000),
    params:
        threads=SOLO_THREADS,
        features=config["features"],
        reference=config["data"]["reference"],
        seed=config["seed"],
    script:
        "../scripts/reference.py"
