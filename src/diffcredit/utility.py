"""The utility of a coalition, v(S): train the model on S's items, generate with shared noise, score a property.

Three ways to get the model of a coalition (Lu, Lin, Kim & Lee 2025), with one generation and scoring path:

- ``sft``: start from the pruned model recovered on all data and fine-tune k steps on S (sparsified fine-tuning);
- ``finetune``: start from the full model and fine-tune k steps on S;
- ``retrain``: train a fresh model on S with the full recipe (the ground truth the other two approximate).

v(∅) is the untrained model's, as in the paper (for a LoRA: the base model's), and so the same in every mode. What a
model is comes from the settings' family (:mod:`diffcredit.families`).

Each measured coalition is stored as one small JSON record keyed by (settings fingerprint, member set, repeat) and
written atomically. A killed job therefore loses at most the coalition in progress, and a coalition shared by two plans,
two budgets or two batchings is computed once. The fingerprint holds the settings and the weights the coalition
starts from (a prepared family folder and a file the property reads by their content, not their path); the record
holds digests of the coalition's items and of the reference folder, and a record whose inputs differ from today's is
measured again rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from diffcredit.contributors import ContributorData
from diffcredit.families import Family
from diffcredit.io import file_digest, folder_digest, save_npz, write_json
from diffcredit.seeds import derive_seed

MODES = ("sft", "finetune", "retrain")


@dataclass(frozen=True)
class UtilitySettings:
    """Everything that determines v(S) besides the data and the starting model."""

    mode: str
    steps: int
    batch_size: int
    lr: float
    model_config: dict
    schedule: dict
    property: str
    seed: int
    optimizer: str = "adam"
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    # utility.ema: continue: the start model's EMA goes on through the fine-tune from the step count of the run that
    # made it (its decay stays ~0.9991 instead of restarting); 0 starts a fresh EMA (fresh, the authors' code).
    ema_step: int = 0
    n_samples: int = 512
    inference_steps: int = 10  # the schema's defaults (utility.inference_steps, utility.sampler)
    sampler: str = "dpmsolver++"
    property_options: dict = field(default_factory=dict)
    precision: str = "fp32"
    sample_batch_size: int = 256
    # the model family (diffcredit.families): {model: the config's model section, directory: its prepared folder};
    # None: the pixel family of model_config and schedule
    family: dict | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown utility mode {self.mode!r}: choose one of {', '.join(MODES)}")

    def fingerprint(self, start_model: str | Path | None = None) -> str:
        """A digest of the settings, the prepared family folder's content and the starting model's weights: records
        of other settings or other weights never match."""
        fields = asdict(self)
        # a local file the property reads (an aesthetic predictor) by its content, as the start model's weights
        fields["property_options"] = {
            key: file_digest(value) if isinstance(value, str) and Path(value).is_file() else value
            for key, value in fields["property_options"].items()
        }
        if fields["family"] is None:
            del fields["family"]  # pixel-family records keep the keys they had before families existed
        else:  # the prepared folder by its content: a run folder copied elsewhere reuses its records
            from diffcredit.families import family_digest

            family = fields["family"]
            fields["family"] = {**family, "directory": family_digest(family["directory"], family["model"]["family"])}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
        if start_model is not None:
            for weights in sorted(Path(start_model).glob("*.safetensors")):
                digest.update(file_digest(weights).encode())
        return digest.hexdigest()[:16]


def model_family(settings: UtilitySettings, data: ContributorData) -> Family:
    """What a model is under `settings`: the family they name (opened once per process), or the pixel family."""
    from diffcredit.families import family_of

    if settings.family is None:
        return Family(settings.model_config, settings.schedule)
    return family_of(settings.family, tuple(data.images.shape[1:]))


def record_key(fingerprint: str, members: Sequence[str], repeat: int) -> str:
    """The store key of one measurement: independent of coalition ids, plan and member order."""
    payload = json.dumps([fingerprint, sorted(members), int(repeat)])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class UtilityStore:
    """A folder of one JSON record per measured (member set, repeat)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, record: dict) -> None:
        write_json(self.path(key), record)


def coalition_model(
    members: Sequence[str],
    repeat: int,
    *,
    data: ContributorData,
    settings: UtilitySettings,
    start_model: str | Path | None,
    device: str | None = None,
):
    """The model standing for coalition `members`, and seconds spent per stage (``load``, ``train``)."""
    family = model_family(settings, data)
    seconds: dict[str, float] = {}
    average = None
    tic = time.perf_counter()
    if not members:
        # Each repeat of v(∅) is another initialisation, so its repeats measure the seed noise; repeat 0 keeps the
        # seed of single measurements, so stored records stay valid.
        init = (
            derive_seed(settings.seed, "untrained-model")
            if repeat == 0
            else derive_seed(settings.seed, "untrained-model", repeat)
        )
        model = family.null_model(seed=init)
    elif settings.mode == "retrain":
        model = family.build(seed=derive_seed(settings.seed, "retrain-init", repeat))
    else:
        if start_model is None:
            raise ValueError(f"utility mode {settings.mode!r} needs a starting model directory")
        model = family.load(start_model)
        if settings.ema_decay is not None:
            # As the SFT-Shapley authors: the fine-tune starts from the start run's raw weights, and a fresh EMA
            # (ema_step 0) averages from them; a continued one carries on the run's average.
            average = [p.detach().clone() for p in model.parameters()] if settings.ema_step > 0 else None
            family.load_raw(model, start_model)
    seconds["load"] = time.perf_counter() - tic
    if members:
        family.fit(
            model,
            data.subset(members),
            steps=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=derive_seed(settings.seed, f"{settings.mode}-train", repeat),
            optimizer=settings.optimizer,
            ema_decay=settings.ema_decay,
            ema_step=settings.ema_step if settings.mode != "retrain" else 0,
            ema_start=average,
            grad_clip=settings.grad_clip,
            device=device,
            precision=settings.precision,
        )
        seconds["train"] = time.perf_counter() - tic - seconds["load"]
    return model, seconds


def measure_coalition(
    members: Sequence[str],
    repeat: int,
    *,
    data: ContributorData,
    settings: UtilitySettings,
    start_model: str | Path | None,
    score: Callable[[np.ndarray], float],
    higher_is_better: bool,
    device: str | None = None,
    keep_dir: Path | None = None,
    keep: Sequence[str] = (),
) -> tuple[dict, np.ndarray]:
    """Train, generate and score one coalition; returns its record and its samples.

    `keep` may name ``checkpoints`` (the coalition's model) and ``samples`` (all its images) to save in `keep_dir`.
    """
    from diffcredit.properties import oriented
    from diffcredit.training import peak_memory, reset_peak_memory, select_device

    family = model_family(settings, data)

    target_device = select_device(device or "auto")
    reset_peak_memory(target_device)
    model, seconds = coalition_model(
        members, repeat, data=data, settings=settings, start_model=start_model, device=device
    )
    tic = time.perf_counter()
    samples = family.generate(
        model,
        settings.n_samples,
        seed=derive_seed(settings.seed, "generation-noise"),
        inference_steps=settings.inference_steps,
        sampler=settings.sampler,
        batch_size=settings.sample_batch_size,
        device=device,
        precision=settings.precision,
    )
    seconds["sample"] = time.perf_counter() - tic
    tic = time.perf_counter()
    value = float(score(samples))
    seconds["score"] = time.perf_counter() - tic
    if "checkpoints" in keep:
        family.save(model, keep_dir / "model")
    if "samples" in keep:
        save_npz(keep_dir / "samples.npz", samples=samples)
    record = {
        "members": list(members),
        "repeat": int(repeat),
        "mode": settings.mode,
        "property": settings.property,
        "value": value,
        "higher_is_better": bool(higher_is_better),
        "utility": oriented(value, higher_is_better),
        "n_items": int(data.counts().reindex(members).sum()),
        "n_samples": settings.n_samples,
        "seed": settings.seed,
        "seconds": seconds,
        "device": str(target_device),
        "peak_memory": peak_memory(target_device),  # CUDA bytes over fine-tune, generation and scoring
    }
    return record, samples


def evaluate_coalitions(
    coalitions: pd.DataFrame,
    *,
    repeats: int,
    data: ContributorData,
    settings: UtilitySettings,
    start_model: str | Path | None,
    store: UtilityStore,
    reference_dir: str | Path,
    device: str | None = None,
    keep_dir: Path | None = None,
    keep: Sequence[str] = (),
    preview: int = 64,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Utilities of every row of `coalitions` (``coalition``, ``members``), one row per (coalition, repeat).

    A row is measured max(its ``repeats`` cell, `repeats`) times (just `repeats` without that column).

    `keep` names what to keep of each new measurement under `keep_dir` (see `measure_coalition`).
    Stored records are reused; new ones are stored as soon as they are measured. The first `preview` samples of each
    new measurement are stored beside its record for figures. Column ``fresh`` tells the rows measured by this call.
    """
    from diffcredit.properties import load_property

    prop = load_property(settings.property, reference_dir, **settings.property_options)
    fingerprint = settings.fingerprint(start_model)
    reference = folder_digest(reference_dir)
    planned = coalitions["repeats"].to_numpy(int) if "repeats" in coalitions else np.ones(len(coalitions), int)
    counts = np.maximum(planned, repeats)
    rows = []
    for coalition, members_cell, count in zip(coalitions["coalition"], coalitions["members"], counts, strict=True):
        members = [m for m in str(members_cell).split(",") if m] if isinstance(members_cell, str) else []
        # what a measurement is made of besides the settings: a record of other items or another reference is stale
        # (records stored before the check carry no inputs and are trusted)
        inputs = {"items": data.subset(members).digest(), "reference": reference}
        for repeat in range(int(count)):
            key = record_key(fingerprint, members, repeat)
            record = store.get(key)
            if record is not None and record.get("inputs", inputs) != inputs:
                log(f"{coalition} repeat {repeat}: stored for other items or another reference; measuring again")
                record = None
            fresh = record is None
            if fresh:
                kept = keep_dir / coalition / f"repeat{repeat}" if keep else None
                if kept is not None:
                    kept.mkdir(parents=True, exist_ok=True)
                record, samples = measure_coalition(
                    members,
                    repeat,
                    data=data,
                    settings=settings,
                    start_model=start_model,
                    score=prop,
                    higher_is_better=prop.higher_is_better,
                    device=device,
                    keep_dir=kept,
                    keep=keep,
                )
                record["inputs"] = inputs
                preview_path = store.path(key).with_suffix(".npz")
                save_npz(preview_path, samples=samples[:preview])
                store.put(key, record)
                log(
                    f"{coalition} repeat {repeat}: {record['property']} = {record['value']:.4g} "
                    f"({sum(record['seconds'].values()):.1f} s on {record['device']})"
                )
            else:
                log(f"{coalition} repeat {repeat}: stored ({record['property']} = {record['value']:.4g})")
            rows.append(
                {
                    "coalition": coalition,
                    "repeat": repeat,
                    "utility": record["utility"],
                    "value": record["value"],
                    "property": record["property"],
                    "higher_is_better": record["higher_is_better"],
                    "n_items": record["n_items"],
                    "seconds": sum(record["seconds"].values()),
                    **{f"seconds_{stage}": s for stage, s in record["seconds"].items()},
                    "device": record["device"],
                    "record": key,
                    "fresh": fresh,
                }
            )
    return pd.DataFrame(rows)
