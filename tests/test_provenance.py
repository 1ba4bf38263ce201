"""The yardstick's provenance reaches the bundle and the report: a trusted reference named, or the plain warning."""

from __future__ import annotations

import html
import json
import tarfile

import pandas as pd
import pytest

from diffcredit.bundle import ARCHIVE, bundled_yardstick, make_bundle, verify_bundle
from diffcredit.properties import prepare_reference, reference_provenance
from diffcredit.report import values_page

BUYER = {"source": "npz", "path": "buyer.npz"}
TINY = {"seed": 0, "classifier_steps": 5, "feature_dim": 8, "n_clusters": 3}


@pytest.fixture(scope="module")
def references(tmp_path_factory, digits) -> dict:
    """Two prepared reference folders: the buyer's trusted one, and the contributors' held-out split."""
    root = tmp_path_factory.mktemp("references")
    images, labels = digits.images, digits.labels
    prepare_reference(
        root / "trusted", reference_images=images[:60], reference_labels=labels[:60], trusted=True, source=BUYER, **TINY
    )
    prepare_reference(
        root / "heldout",
        reference_images=images[60:90],
        train_images=images[90:150],
        train_labels=labels[90:150],
        **TINY,
    )
    return {"trusted": root / "trusted", "heldout": root / "heldout"}


def test_the_provenance_names_the_trusted_reference_or_warns(references):
    trusted, heldout = (reference_provenance(references[kind]) for kind in ("trusted", "heldout"))
    assert trusted["trusted"] is True and trusted["source"] == BUYER
    assert "trusted reference that no contributor supplied" in trusted["statement"]
    assert "data.reference = source npz, path buyer.npz" in trusted["statement"]
    assert f"(digest {trusted['reference_digest'][:12]})" in trusted["statement"]
    assert heldout["trusted"] is False and heldout["source"] is None
    assert heldout["statement"].startswith("Warning: the contributors shape their own yardstick")
    assert "held out from the contributors' items" in heldout["statement"]
    assert trusted["reference_digest"] != heldout["reference_digest"]


def test_provenance_of_a_folder_that_is_no_reference_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reference\.json' does not exist: give the run's prepared reference"):
        reference_provenance(tmp_path)


@pytest.mark.parametrize("kind", ["trusted", "heldout"])
def test_the_bundle_says_which_yardstick_the_values_were_measured_by(references, kind, tmp_path):
    (tmp_path / "values.csv").write_text("contributor,value\na,1\n")
    out = tmp_path / "bundle"
    make_bundle({"values.csv": tmp_path / "values.csv"}, out, {"config": {"seed": 0}}, reference=references[kind])
    assert verify_bundle(out) == []
    stated = bundled_yardstick(out)
    assert stated == reference_provenance(references[kind])
    assert stated["trusted"] is (kind == "trusted")
    assert stated["statement"].startswith("Warning: the contributors shape") is (kind == "heldout")
    with tarfile.open(out / ARCHIVE, "r:gz") as tar:  # the reference's own record travels with the values
        assert tar.extractfile("reference.json").read() == (references[kind] / "reference.json").read_bytes()
        assert json.loads(tar.extractfile("MANIFEST.json").read())["metadata"]["config"] == {"seed": 0}
    make_bundle({"values.csv": tmp_path / "values.csv"}, tmp_path / "plain")
    assert bundled_yardstick(tmp_path / "plain") is None


@pytest.mark.parametrize("kind", ["trusted", "heldout"])
def test_the_values_page_opens_with_the_yardstick(references, kind, tmp_path):
    pd.DataFrame(
        {"contributor": ["a", "b"], "value": [2.0, 1.0], "stderr": 0.1, "ci_low": [1.8, 0.8], "ci_high": [2.2, 1.2]}
    ).assign(rank=[1, 2]).to_csv(tmp_path / "values.csv", index=False)
    pd.DataFrame({"round": [0], "n_coalitions": [4], "stop": [True], "reason": ["budget"]}).to_csv(
        tmp_path / "rounds.tsv", sep="\t", index=False
    )
    options = {"estimator": "exact", "kind": "Shapley", "confidence": 0.95}
    values_page(
        tmp_path / "values.csv", tmp_path / "rounds.tsv", tmp_path / "page.html", reference=references[kind], **options
    )
    page = (tmp_path / "page.html").read_text()
    provenance = reference_provenance(references[kind])
    statement = page.index(html.escape(provenance["statement"]))
    assert statement < page.index("<table")  # stated before any number
    assert ("<p class='warning'>" in page) is (kind == "heldout")
    first_table = page[page.index("<table") : page.index("</table>")]
    assert "contributor" in first_table and "digest" not in first_table  # the values stay the first table
    assert "<h3>Yardstick</h3>" in page and provenance["reference_digest"] in page
    assert ("buyer.npz" in page) is (kind == "trusted")
    values_page(tmp_path / "values.csv", tmp_path / "rounds.tsv", tmp_path / "plain.html", **options)
    assert "Yardstick" not in (tmp_path / "plain.html").read_text()
