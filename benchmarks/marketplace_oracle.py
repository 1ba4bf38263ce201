"""The marketplace's planted answer under each property and each yardstick, with a perfect generator.

No diffusion model is trained: the generated images of coalition S are S's own items (a model that reproduces its
training data exactly) and v(∅) scores 512 uniform-noise images (the untrained model's stand-in). Exact Shapley
values over all 2^11 coalitions of `load_marketplace`, for FID and the four k-NN manifold scores (k = 5), under

- the trusted yardstick: the marketplace's reference, the classifier fitted on half of it (what `data.reference`
  gives), and
- the held-out yardstick: 20% of every contributor's items as reference, the classifier trained on the other 80%
  with the contributor as the label (what the default gives, where contributors are classes).

Features are extracted once per yardstick; each coalition's value is computed from its items' features. Prints a
Markdown table per yardstick (value and rank per contributor and property) and writes benchmarks/marketplace_oracle.json.
Usage: python benchmarks/marketplace_oracle.py [classifier_steps]   (~5 min on one contended core)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffcredit.coalitions import plan
from diffcredit.contributors import ContributorData, load_marketplace, split_heldout
from diffcredit.properties import Reference, prepare_reference
from diffcredit.properties.features import extract_features
from diffcredit.properties.fid import feature_stats, fid_from_stats
from diffcredit.properties.precision_recall import manifold_scores
from diffcredit.shapley import aggregate

PROPERTIES = ("fid", "precision", "recall", "density", "coverage")


def coalition_scores(reference: np.ndarray, features: np.ndarray, k: int = 5) -> dict[str, float]:
    """Oriented utilities (higher is better) of generated features against reference features."""
    scores = manifold_scores(reference, features, k)
    scores["fid"] = -fid_from_stats(*feature_stats(features), *feature_stats(reference))
    return scores


def oracle_values(
    data: ContributorData, reference_features: np.ndarray, item_features: np.ndarray, empty_features: np.ndarray
) -> dict[str, pd.DataFrame]:
    ids = data.contributor_ids
    table = plan(ids, "exact", None, 0)
    rows = []
    for coalition, members in zip(table["coalition"], table["members"], strict=True):
        chosen = empty_features if not members else item_features[np.isin(data.contributors, members.split(","))]
        rows.append({"coalition": coalition, **coalition_scores(reference_features, chosen)})
    utilities = pd.DataFrame(rows)
    return {
        name: aggregate(
            table,
            utilities.rename(columns={name: "utility"})[["coalition", "utility"]],
            contributors=ids,
            convergence=False,
        ).table
        for name in PROPERTIES
    }


def yardstick(name: str, folder: Path, data: ContributorData, steps: int, empty: np.ndarray) -> dict:
    if name == "trusted":
        _, ref = load_marketplace()
        prepare_reference(
            folder,
            reference_images=ref.images,
            reference_labels=ref.labels,
            seed=0,
            trusted=True,
            classifier_steps=steps,
        )
    else:
        train, heldout = split_heldout(data, 0.2, seed=0)
        owner = {cid: i for i, cid in enumerate(data.contributor_ids)}
        labels = np.array([owner[c] for c in train.contributors])
        prepare_reference(
            folder,
            train_images=train.images,
            train_labels=labels,
            reference_images=heldout.images,
            seed=0,
            classifier_steps=steps,
        )
    ref = Reference.load(folder)
    values = oracle_values(
        data, ref.features, extract_features(ref.extractor, data.images), extract_features(ref.extractor, empty)
    )
    return {prop: table.set_index("contributor")["value"].to_dict() for prop, table in values.items()}


def markdown(values: dict[str, dict[str, float]]) -> str:
    ids = list(next(iter(values.values())))
    lines = [
        "| contributor | " + " | ".join(f"{p} (rank)" for p in PROPERTIES) + " |",
        "| --- |" + " --- |" * len(PROPERTIES),
    ]
    ranks = {p: pd.Series(v).rank(ascending=False, method="min").astype(int) for p, v in values.items()}
    for cid in ids:
        cells = [f"{values[p][cid]:+.3g} ({ranks[p][cid]})" for p in PROPERTIES]
        lines.append(f"| {cid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(steps: int = 1500) -> None:
    torch.set_num_threads(1)
    data, _ = load_marketplace()
    empty = np.random.default_rng(0).uniform(-1, 1, size=(512, *data.images.shape[1:])).astype(np.float32)
    results = {"classifier_steps": steps}
    for name in ("trusted", "heldout"):
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = yardstick(name, Path(tmp), data, steps, empty)
        print(f"\n## {name} yardstick ({time.perf_counter() - tic:.0f} s)\n\n{markdown(results[name])}", flush=True)
    Path(__file__).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
