"""The coalition store: a finished coalition is never measured twice, and a stale one is never trusted."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from diffcredit.contributors import ContributorData
from diffcredit.properties import prepare_reference
from diffcredit.utility import UtilitySettings, UtilityStore, evaluate_coalitions

COALITIONS = pd.DataFrame({"coalition": ["c0", "c1"], "members": ["digit0", "digit0,digit1"]})


@pytest.fixture
def setting(digits, tiny_config, tiny_schedule, tmp_path):
    """Two contributors' digits, a reference of held-out digits, and a retraining recipe of two steps."""
    data = digits.subset(["digit0", "digit1"])
    rest = digits.subset(["digit2", "digit3"])
    reference = tmp_path / "reference"
    _reference(reference, rest, seed=0)
    settings = UtilitySettings(
        mode="retrain",
        steps=2,
        batch_size=8,
        lr=1e-3,
        model_config=tiny_config,
        schedule=tiny_schedule,
        property="fid",
        seed=0,
        n_samples=16,
        inference_steps=2,
    )
    return data, rest, reference, settings


def _reference(folder, items, seed):
    prepare_reference(
        folder, reference_images=items.images[:96], trusted=True, seed=seed, classifier_steps=20, n_clusters=4
    )


def _measure(data, settings, reference, store, log):
    return evaluate_coalitions(
        COALITIONS,
        repeats=1,
        data=data,
        settings=settings,
        start_model=None,
        store=store,
        reference_dir=reference,
        log=log,
    )


def test_a_stored_coalition_is_reused_until_its_items_or_its_reference_change(setting, tmp_path):
    data, rest, reference, settings = setting
    store, log = UtilityStore(tmp_path / "store"), []
    first = _measure(data, settings, reference, store, log.append)
    again = _measure(data, settings, reference, store, log.append)
    assert first["fresh"].all() and not again["fresh"].any()
    assert again["utility"].tolist() == first["utility"].tolist()

    # digit1's items replaced: the coalition holding them is measured again, the other is not
    other = ContributorData(
        np.concatenate([data.images[data.contributors == "digit0"], rest.images[:20]]),
        ["digit0"] * int((data.contributors == "digit0").sum()) + ["digit1"] * 20,
        [*data.item_ids[data.contributors == "digit0"], *(f"new{i}" for i in range(20))],
    )
    changed = _measure(other, settings, reference, store, log.append)
    assert changed["fresh"].tolist() == [False, True]
    assert "c1 repeat 0: stored for other items or another reference; measuring again" in log

    # another reference (another seed's classifier): every coalition is measured again
    _reference(reference, rest, seed=1)
    assert _measure(other, settings, reference, store, log.append)["fresh"].all()


def test_records_stored_before_the_inputs_were_recorded_are_trusted(setting, tmp_path):
    data, _, reference, settings = setting
    store = UtilityStore(tmp_path / "store")
    first = _measure(data, settings, reference, store, lambda _: None)
    for key in first["record"]:
        record = json.loads(store.path(key).read_text())
        assert set(record.pop("inputs")) == {"items", "reference"}
        store.put(key, record)
    assert not _measure(data, settings, reference, store, lambda _: None)["fresh"].any()


def test_a_file_the_property_reads_enters_the_fingerprint_by_its_content(setting, tmp_path):
    settings = setting[3]

    def fingerprint(path):
        options = {"predictor": str(path), "quantile": 0.9}
        return dataclasses.replace(settings, property="aesthetic", property_options=options).fingerprint()

    (tmp_path / "a.pt").write_bytes(b"head 1")
    (tmp_path / "b.pt").write_bytes(b"head 1")
    assert fingerprint(tmp_path / "a.pt") == fingerprint(tmp_path / "b.pt")  # the same predictor elsewhere
    before = fingerprint(tmp_path / "a.pt")
    (tmp_path / "a.pt").write_bytes(b"head 2")
    assert fingerprint(tmp_path / "a.pt") != before  # replaced under the same path
