"""The workflow's stages as package functions: paths and settings in, files out.

Each Snakemake rule's script reads its `snakemake` object and calls one function here, so every stage runs and is tested
without Snakemake. Outputs are written through :mod:`diffcredit.io` (atomically), so that a killed job leaves nothing
half-written for the next run to trust. The `evaluate` target's stages live in :mod:`diffcredit.fidelity`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from diffcredit.contributors import ContributorData, load_source, split_heldout, write_manifest
from diffcredit.io import atomic_dir, write_json, write_table
from diffcredit.seeds import derive_seed
from diffcredit.utility import UtilitySettings, UtilityStore, evaluate_coalitions


def prepare_data(
    *,
    source: str,
    path: str | None,
    manifest: str | None,
    heldout_fraction: float,
    seed: int,
    train_out: str,
    heldout_out: str,
    contributors_out: str,
    reference: dict | None = None,
    marketplace: bool = False,
    log=print,
) -> None:
    """Load the contributors' data and the real images the properties compare with (the yardstick), in `heldout_out`.

    With `reference` ({source, path, manifest}: the buyer's own images) every contributor item trains and the
    reference is checked against them before anything trains (no images, other size or channels: refused; exact
    copies of training items: a warning with their count and share). Without it, a share of each contributor's items
    is held out (stratified per contributor) and the log says that the contributors shape their own yardstick; a
    `marketplace` config refuses that.
    """
    from diffcredit.contributors import UNTRUSTED_NOTE, check_reference, load_reference, yardstick

    label = yardstick(reference, marketplace=marketplace)
    data = load_source(source, path=path, manifest=manifest)
    if reference is None:
        train, heldout = split_heldout(data, heldout_fraction, seed=derive_seed(seed, "heldout-split"))
        log(f"yardstick: {label}. Warning: {UNTRUSTED_NOTE}")
    else:
        train, heldout = data, load_reference(reference["source"], reference.get("path"), reference.get("manifest"))
        overlap = check_reference(heldout, train)
        if overlap:
            log(f"warning: {overlap}")
        log(f"yardstick: {label}, {len(heldout)} images ({reference['source']}); all {len(train)} items train")
    train.save(train_out)
    heldout.save(heldout_out)
    write_manifest(train, contributors_out)


def prepare_family(
    *, train_data: str, out: str, model: dict, seed: int, heldout_data: str | None = None, log=print
) -> None:
    """Make what the model family needs besides the data, once (see :func:`diffcredit.families.prepare_family`)."""
    from diffcredit.families import prepare_family as prepare

    heldout = ContributorData.load(heldout_data) if heldout_data is not None else None
    with atomic_dir(out) as staging:
        prepare(model, staging, data=ContributorData.load(train_data), heldout=heldout, seed=seed, log=log)


def model_family(data: ContributorData, family: dict | None, *, unet: dict | None = None, schedule: dict | None = None):
    """The run's model family: the config's ``model`` section and the folder :func:`prepare_family` wrote
    (`family`: {model, directory}); without them, the pixel family of `unet` and `schedule`."""
    from diffcredit.families import family_of

    return family_of(family, tuple(data.images.shape[1:]), unet=unet, schedule=schedule)


def train_full(
    *,
    train_data: str,
    out: str,
    stats_out: str,
    seed: int,
    unet: dict | None = None,
    schedule: dict | None = None,
    inrun: dict | None = None,
    family: dict | None = None,
    **training,
) -> None:
    """Train the full model (the grand coalition) from scratch, in the run's `family` (None: pixel, of `unet` and
    `schedule`); with `inrun` (heldout_data, out, first_order_out, order, validation_batch_size), accumulate In-Run
    Data Shapley during this very run."""
    from diffcredit.attribution import inrun as in_run

    data = ContributorData.load(train_data)
    kind = model_family(data, family, unet=unet, schedule=schedule)
    model = kind.build(seed=derive_seed(seed, "full-init"))
    observer = None
    if inrun:
        observer = in_run.observer_for(
            kind,
            data,
            inrun["heldout_data"],
            seed=seed,
            order=inrun["order"],
            validation_batch_size=inrun["validation_batch_size"],
        )
        training["observer"] = observer
    result = kind.fit(
        model,
        data,
        seed=derive_seed(seed, "full-train"),
        log_every=_log_interval(training["steps"]),
        keep_raw=True,
        **training,
    )
    kind.save(model, out, raw=result.raw_weights)
    if observer is not None:
        in_run.write_values(
            observer, data, out=inrun["out"], first_order_out=inrun["first_order_out"], seconds=result.seconds
        )
    _write_stats(stats_out, result, stage="train_full")


def prune_model(
    *,
    full_model: str,
    train_data: str,
    out: str,
    stats_out: str,
    ratio: float,
    importance: str,
    schedule: dict,
    seed: int,
    family: dict | None = None,
) -> None:
    """Prune the full model once (torch-pruning: UNet channels, or a LoRA's rank components)."""
    data = ContributorData.load(train_data)
    kind = model_family(data, family, schedule=schedule)
    tic = time.perf_counter()
    pruned, stats = kind.prune(
        kind.load(full_model), ratio, importance=importance, data=data, seed=derive_seed(seed, "prune")
    )
    seconds = time.perf_counter() - tic
    kind.save(pruned, out)
    write_json(stats_out, {"stage": "prune", "seconds": seconds, **stats})


def recover(
    *,
    pruned_model: str,
    train_data: str,
    out: str,
    stats_out: str,
    schedule: dict,
    seed: int,
    family: dict | None = None,
    **training,
) -> None:
    """Fine-tune the pruned model on all data, the starting point of every coalition's sparsified fine-tune."""
    data = ContributorData.load(train_data)
    kind = model_family(data, family, schedule=schedule)
    model = kind.load(pruned_model)
    if training["steps"] > 0:
        result = kind.fit(
            model,
            data,
            seed=derive_seed(seed, "recover"),
            log_every=_log_interval(training["steps"]),
            keep_raw=True,
            **training,
        )
    else:
        result = None
    kind.save(model, out, raw=result.raw_weights if result else None)
    _write_stats(stats_out, result, stage="recover")


def prepare_reference(
    *,
    train_data: str | None,
    heldout_data: str,
    out: str,
    seed: int,
    extractor: str | None,
    classifier_steps: int,
    feature_dim: int,
    reference: dict | None = None,
    fit_fraction: float = 0.5,
    labels: str = "items",
    log=print,
) -> None:
    """Fit the feature extractor (unless a local one is given) and cache the reference statistics.

    With a trusted `reference` (the config's ``data.reference``) the extractor is fitted on the reference in
    `heldout_data` alone (a share `fit_fraction` of it; the rest gives the statistics) and `train_data` is not read
    (pass None); otherwise on the contributors' training items, with their own labels (`labels="items"`: digit
    classes, letters) or with their contributor as the label (``"contributors"``: the extractor then tells
    contributors' styles apart, as a face embedder tells identities apart in the paper's diversity case).
    """
    from diffcredit.properties import prepare_reference as prepare
    from diffcredit.properties import reference_provenance

    if labels not in ("items", "contributors"):
        raise ValueError(f"features.labels={labels!r}: choose 'items' (the data's labels) or 'contributors'")
    heldout = ContributorData.load(heldout_data)
    reference_labels = heldout.labels
    if reference is None:
        train = ContributorData.load(train_data)
        train_labels = train.labels
        if labels == "contributors":
            ids = {cid: k for k, cid in enumerate(train.contributor_ids)}
            train_labels = np.array([ids[c] for c in train.contributors], dtype=np.int64)
            reference_labels = np.array([ids[c] for c in heldout.contributors], dtype=np.int64)
        fit = {"train_images": train.images, "train_labels": train_labels}
    elif labels == "contributors":
        raise ValueError(
            "features.labels: contributors fits the extractor on the contributors' items, which a trusted reference "
            "(data.reference) never lets it see: use labels: items, or drop data.reference"
        )
    else:
        fit = {"trusted": True, "source": reference, "fit_fraction": fit_fraction}
    with atomic_dir(out) as tmp:
        prepare(
            tmp,
            reference_images=heldout.images,
            reference_labels=reference_labels,
            seed=derive_seed(seed, "feature-extractor"),
            feature_dim=feature_dim,
            classifier_steps=classifier_steps,
            extractor=extractor,
            **fit,
        )
    log(reference_provenance(out)["statement"])


def plan_table(
    *,
    plan: str,
    contributors: list[str],
    seed: int,
    budget: int,
    main_estimator: str,
    lds_subsets: int,
    alpha: float | list[float],
    agreement_coalitions: int,
    bound_repeats: int = 2,
    null_has_noise: bool = True,
) -> pd.DataFrame:
    """The coalitions of a named plan: an estimator's, the LDS held-out subsets, or the retrained agreement prefix."""
    from diffcredit.coalitions import plan as plan_coalitions
    from diffcredit.evaluation import heldout_subsets

    if plan == "lds":
        subsets = heldout_subsets(contributors, lds_subsets, alpha=alpha, seed=seed)
        return pd.DataFrame(
            {
                "coalition": [f"s{i:06d}" for i in range(len(subsets))],
                "members": [",".join(s) for s in subsets],
                "estimator": "lds",
            }
        )
    # The agreement plan is a prefix of the estimation plan, so its coalition ids and utilities line up.
    estimator = main_estimator if plan == "agreement" else plan
    table = plan_coalitions(
        contributors, estimator, budget, seed, bound_repeats=bound_repeats, null_has_noise=null_has_noise
    )
    return table.head(agreement_coalitions) if plan == "agreement" else table


def write_plan(spec: dict, out: str) -> None:
    from diffcredit.coalitions import write_coalitions

    write_coalitions(plan_table(**spec), out)


def coalition_utilities(
    *,
    batch: dict[str, list],
    train_data: str,
    reference: str,
    start_model: str | None,
    store: str,
    out: str,
    repeats: int,
    settings: dict,
    keep: list[str] = (),
    keep_dir: str | None = None,
    log=print,
) -> None:
    """Measure v(S) for one job's plan rows; finished measurements come from the store.

    `batch` holds the rows' columns ``coalition``, ``members`` and, if the plan has it, ``repeats``: each row is
    measured max(its ``repeats``, `repeats`) times.
    """
    data = ContributorData.load(train_data)
    table = evaluate_coalitions(
        pd.DataFrame(batch),
        repeats=repeats,
        data=data,
        settings=utility_settings(data, settings),
        start_model=start_model,
        store=UtilityStore(store),
        reference_dir=reference,
        keep_dir=Path(keep_dir) if keep_dir else None,
        keep=keep,
        log=log,
    )
    write_table(table, out)


def utility_settings(data: ContributorData, settings: dict) -> UtilitySettings:
    """UtilitySettings from the workflow's settings dict, with the UNet config of the run's model family (settings
    ``family``; default: the pixel family for `data`)."""
    settings = dict(settings)
    family = model_family(data, settings.get("family"), unet=settings.pop("unet", None), schedule=settings["schedule"])
    return UtilitySettings(model_config=family.unet_config, **settings)


def collect_utilities(batches: list[str], out: str) -> pd.DataFrame:
    """Concatenate the batch tables of one plan into its utilities table (`coalition`, `utility`, ...)."""
    table = pd.concat([pd.read_csv(path, sep="\t") for path in batches], ignore_index=True)
    # Which rows a job measured and which it found stored depends on the run's history, not on its result.
    table = table.drop(columns="fresh")
    write_table(table, out)
    return table


def aggregate(
    *,
    coalitions: str,
    utilities: str,
    contributors: str,
    confidence: float,
    values_out: str,
    convergence_out: str,
    figure_out: str,
    convergence_figure_out: str,
    rounds_out: str,
    round_values: list[str] = (),
    decisions: list[str] = (),
    log=print,
) -> None:
    """The plan's estimator's values with intervals, their convergence, the rounds, and the two figures.

    With adaptive rounds (see :mod:`diffcredit.rounds`), `round_values` and `decisions` are each round's values and
    stopping decision, and the values are those of the plan prefix the last round evaluated; without, the whole plan
    is one round. The log says how the values and intervals were made (for kernelshap: what a pair was worth).
    """
    from diffcredit.coalitions import read_coalitions
    from diffcredit.estimators import REGISTRY
    from diffcredit.figures import plot_convergence, plot_values
    from diffcredit.rounds import decide, read_decision, round_of, rounds_table

    decided = [read_decision(path) for path in decisions]
    plan = read_coalitions(coalitions)
    if decided:
        plan = plan.head(decided[-1].n_coalitions)
    result, prop = _estimate(plan, utilities, contributors, confidence)
    log(f"{result.estimator}: {result.method}")
    if decided:
        per_round = [pd.read_csv(path) for path in round_values]
    else:
        decided = [decide(result.table, None, round=0, n_coalitions=len(plan), rule="none", target=None)]
        per_round = [result.table]
    sizes = [decision.n_coalitions for decision in decided]
    table = result.table.assign(round=len(decided) - 1)
    convergence = result.convergence.assign(round=round_of(result.convergence["n_coalitions"], sizes))
    rounds = rounds_table(per_round, decided)
    write_table(table, values_out, sep=",")
    write_table(convergence, convergence_out)
    write_table(rounds, rounds_out)
    estimator = str(table["estimator"].iloc[0])
    name = REGISTRY[estimator].values
    efficiency = f"; sum = {table['value'].sum():.4g}" if name == "Shapley" else ""
    plot_values(
        table,
        figure_out,
        confidence=confidence,
        name=name,
        title=f"{estimator}: {name} values of {prop} (oriented: higher is better){efficiency}",
    )
    plot_convergence(
        convergence,
        rounds,
        convergence_figure_out,
        confidence=confidence,
        name=name,
        title=f"{estimator}: {name} values of {prop} against the coalitions used",
    )


def round_values(
    *,
    coalitions: str,
    utilities: str,
    contributors: str,
    confidence: float,
    n_coalitions: int,
    round: int,
    previous: str | None,
    stopping: dict,
    last: bool,
    values_out: str,
    decision_out: str,
) -> None:
    """One adaptive round: the values of the plan's first `n_coalitions` rows and whether another round runs.

    `previous` is the round before's values (the ``rank_stable`` rule compares with it); `last` says the budget is
    spent.
    """
    from diffcredit.coalitions import read_coalitions
    from diffcredit.rounds import decide, write_decision

    plan = read_coalitions(coalitions).head(n_coalitions)
    result, _ = _estimate(plan, utilities, contributors, confidence, convergence=False)
    write_table(result.table, values_out, sep=",")
    decision = decide(
        result.table,
        pd.read_csv(previous) if previous else None,
        round=round,
        n_coalitions=n_coalitions,
        rule=stopping["rule"],
        target=stopping["target"],
        relative=stopping["relative"],
        last=last,
    )
    write_decision(decision, decision_out)


def _estimate(plan: pd.DataFrame, utilities: str, contributors: str, confidence: float, convergence: bool = True):
    """The aggregation of `plan`'s measured utilities, and the name of the property they measure."""
    from diffcredit.coalitions import read_contributors
    from diffcredit.shapley import aggregate as estimate
    from diffcredit.shapley import read_utilities

    measured = read_utilities(utilities)
    result = estimate(
        plan, measured, contributors=read_contributors(contributors), confidence=confidence, convergence=convergence
    )
    return result, (measured["property"].iloc[0] if "property" in measured else "utility")


def sample_figure(
    *,
    heldout_data: str,
    full_model: str,
    recovered_model: str,
    utilities: str,
    coalitions: str,
    store: str,
    schedule: dict,
    inference_steps: int,
    sampler: str,
    seed: int,
    out: str,
    n: int = 32,
    family: dict | None = None,
) -> None:
    """Real images beside samples of the full and recovered models and of the ∅, N and singleton coalitions."""
    from diffcredit.coalitions import member_sets, read_coalitions
    from diffcredit.sampling import save_grid

    heldout = ContributorData.load(heldout_data)
    kind = model_family(heldout, family, schedule=schedule)
    panels = {"real (held out)": heldout.images[:n]}
    for label, directory in (("full model", full_model), ("pruned + recovered", recovered_model)):
        panels[label] = kind.generate(
            kind.load(directory),
            n,
            seed=derive_seed(seed, "generation-noise"),
            inference_steps=inference_steps,
            sampler=sampler,
        )
    members = member_sets(read_coalitions(coalitions))
    measured = pd.read_csv(utilities, sep="\t").drop_duplicates("coalition")
    measured["size"] = measured["coalition"].map(lambda c: len(members[c]))
    largest = measured["size"].max()
    chosen = pd.concat(
        [
            measured[measured["size"] == 0],
            measured[measured["size"] == largest],
            measured[measured["size"] == 1].head(2),
        ]
    )
    empty = "empty coalition (the base)" if kind.name == "text_lora" else "empty coalition (untrained)"
    for coalition, record, size in zip(chosen["coalition"], chosen["record"], chosen["size"], strict=True):
        label = (
            empty if size == 0 else ("all contributors" if size == largest else "only " + ",".join(members[coalition]))
        )
        preview = UtilityStore(store).path(record).with_suffix(".npz")
        with np.load(preview) as samples:
            panels[f"{label}, fine-tuned" if size else label] = samples["samples"][:n]
    save_grid(panels, out, nrow=8)


def bundle(files: dict[str, str], checksums_out: str, *, config: dict, reference: str) -> None:
    """Archive `files` with the run's config, the environment that made them (see bundle.environment) and the
    yardstick of `reference` (the run's reference folder: trusted or the contributors' own, source, path, digest)."""
    from diffcredit.bundle import environment, make_bundle

    metadata = {"config": config, "environment": environment()}
    make_bundle(files, Path(checksums_out).parent, metadata=metadata, reference=reference)


def _log_interval(steps: int) -> int:
    """Report progress about ten times per training run."""
    return max(1, steps // 10)


def set_threads(threads: int) -> None:
    """Compute with ``threads`` torch threads: the count the rule fixed (it changes reductions, hence the bytes)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


def _write_stats(path: str, result, *, stage: str) -> None:
    payload = {"stage": stage}
    if result is not None:
        payload.update(
            seconds=result.seconds,
            steps=result.steps,
            device=result.device,
            peak_memory=result.peak_memory,
            final_loss=float(np.mean(result.losses[-50:])) if result.losses else None,
        )
    write_json(path, payload)
