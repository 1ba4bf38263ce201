# With baselines.inrun.during: train_full, this run also accumulates In-Run Data Shapley (validated on the held-out
# or reference images) and writes its values.
# Once per run, what the model family needs besides the data: a latent family's autoencoder and cached latents, a text
# family's captions (of the held-out items too, where the source has them) and base model (trained here for the
# stand-ins). The pixel family has no such job.
rule prepare_family:
    input:
        train=rules.prepare_data.output.train,
        heldout=rules.prepare_data.output.heldout,
        staged=staged_family(),
    output:
        directory(f"{RUN}/family"),
    log:
        f"{RUN}/logs/prepare_family.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_family.tsv"
    conda:
        ENV
    threads: SOLO_THREADS
    resources:
        runtime=minutes(60),
        mem_mb=memory(8000),
        gpu=1,
    params:
        threads=SOLO_THREADS,
        model=config["model"],
        seed=config["seed"],
    script:
        "../scripts/prepare_family.py"


rule train_full:
    input:
        **({"heldout": rules.prepare_data.output.heldout} if INRUN_IN_TRAIN_FULL else {}),
        train=rules.prepare_data.output.train,
        family=FAMILY_INPUT,
    output:
        **(INRUN_VALUES if INRUN_IN_TRAIN_FULL else {}),
        model=directory(f"{RUN}/models/full"),
        stats=f"{RUN}/models/full.json",
    log:
        f"{RUN}/logs/train_full.log",
    benchmark:
        f"{RUN}/benchmarks/train_full.tsv"
    conda:
        ENV
    threads: SOLO_THREADS
    resources:
        runtime=minutes(120),
        mem_mb=memory(8000),
        gpu=1,
    params:
        threads=SOLO_THREADS,
        training=training_settings("train"),
        inrun=inrun_during_training(),
        unet=config["model"]["unet"],
        schedule=config["model"]["schedule"],
        family=FAMILY,
        seed=config["seed"],
    script:
        "../scripts/train_full.py"


rule prune:
    input:
        model=rules.train_full.output.model,
        train=rules.prepare_data.output.train,
        family=FAMILY_INPUT,
    output:
        model=directory(f"{RUN}/models/pruned"),
        stats=f"{RUN}/models/pruned.json",
    log:
        f"{RUN}/logs/prune.log",
    benchmark:
        f"{RUN}/benchmarks/prune.tsv"
    conda:
        ENV
    threads: 1
    resources:
        runtime=minutes(20),
        mem_mb=memory(8000),
        gpu=1,
    params:
        prune=config["prune"],
        schedule=config["model"]["schedule"],
        family=FAMILY,
        seed=config["seed"],
    script:
        "../scripts/prune.py"


rule recover:
    input:
        model=rules.prune.output.model,
        train=rules.prepare_data.output.train,
        family=FAMILY_INPUT,
    output:
        model=directory(f"{RUN}/models/recovered"),
        stats=f"{RUN}/models/recovered.json",
    log:
        f"{RUN}/logs/recover.log",
    benchmark:
        f"{RUN}/benchmarks/recover.tsv"
    conda:
        ENV
    threads: SOLO_THREADS
    resources:
        runtime=minutes(60),
        mem_mb=memory(8000),
        gpu=1,
    params:
        threads=SOLO_THREADS,
        training=training_settings("recover"),
        schedule=config["model"]["schedule"],
        family=FAMILY,
        seed=config["seed"],
    script:
        "../scripts/recover.py"
