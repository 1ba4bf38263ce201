from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffcredit.contributors import (
    HELDOUT,
    MARKETPLACE_CLEAN,
    MARKETPLACE_CORRUPTED,
    REFERENCE_OWNER,
    TRUSTED,
    UNTRUSTED_NOTE,
    ContributorData,
    check_reference,
    contributor_ids,
    image_digests,
    load_arrays,
    load_digits,
    load_image_folder,
    load_marketplace,
    load_reference,
    load_source,
    marketplace_expectations,
    split_heldout,
    validate_contributor_id,
    write_manifest,
    yardstick,
)


def small_data(contributors: list[str]) -> ContributorData:
    n = len(contributors)
    images = np.linspace(-1, 1, n * 4, dtype=np.float32).reshape(n, 1, 2, 2)
    return ContributorData(images, np.array(contributors), np.array([f"i{k}" for k in range(n)]))


def write_tsv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "-a", "a..b", None])
def test_validate_contributor_id_refuses_and_names_the_value(bad):
    with pytest.raises(ValueError, match="invalid contributor id"):
        validate_contributor_id(bad)


def test_digits_default_contributors_are_the_ten_classes(digits):
    assert len(digits) == 1797
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == np.float32
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    assert digits.contributor_ids == [f"digit{d}" for d in range(10)]
    assert digits.item_ids[0] == "digits-0000" and digits.item_ids[-1] == "digits-1796"
    np.testing.assert_array_equal(digits.contributors, np.char.add("digit", digits.labels.astype(str)))
    assert digits.counts()["digit0"] == 178 and digits.counts().sum() == 1797


def test_digits_manifest_reassigns_every_item(tmp_path, digits):
    owners = ["alice" if i % 3 == 0 else "bob" for i in range(len(digits))]
    manifest = write_tsv(
        tmp_path / "m.tsv", [{"item": i, "contributor": c} for i, c in zip(digits.item_ids, owners, strict=True)]
    )
    data = load_digits(manifest)
    assert data.contributor_ids == ["alice", "bob"]
    assert data.counts().to_dict() == {"alice": 599, "bob": 1198}
    np.testing.assert_array_equal(data.images, digits.images)


REST = [(f"digits-{i:04d}", "x") for i in range(1, 1797)]  # items 1.. of a complete manifest


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("digits-0000", "a")], "1796 items have no contributor, e.g. 'digits-0001'"),
        ([("digits-0000", "a"), ("digits-0000", "b"), *REST], "item 'digits-0000' is assigned more than once"),
        ([("nope", "a"), ("digits-0000", "a"), *REST], "unknown item 'nope'"),
        ([("digits-0000", ""), *REST], "line 2: empty 'contributor'"),
        ([("digits-0000", "a/b"), *REST], r"invalid contributor id 'a/b' \(item 'digits-0000'\)"),
    ],
)
def test_digits_manifest_errors_name_the_item(tmp_path, rows, message):
    manifest = write_tsv(tmp_path / "m.tsv", [{"item": i, "contributor": c} for i, c in rows])
    with pytest.raises(ValueError, match=message):
        load_digits(manifest)


def test_manifest_without_required_column_or_rows_is_refused(tmp_path):
    manifest = write_tsv(tmp_path / "m.tsv", [{"item": "digits-0000", "owner": "a"}])
    with pytest.raises(ValueError, match="missing column 'contributor'"):
        load_digits(manifest)
    (tmp_path / "empty.tsv").write_text("path\tcontributor\n")
    with pytest.raises(ValueError, match=r"empty\.tsv lists no items"):
        load_image_folder(tmp_path / "empty.tsv")


def test_subset_keeps_only_members_in_order():
    data = small_data(["a", "b", "a", "c"])
    part = data.subset(["c", "a"])
    assert list(part.item_ids) == ["i0", "i2", "i3"]
    np.testing.assert_array_equal(part.images, data.images[[0, 2, 3]])
    assert part.contributor_ids == ["a", "c"]


def test_subset_of_nobody_is_empty_and_unknown_is_refused():
    data = small_data(["a", "b"])
    empty = data.subset([])
    assert len(empty) == 0 and empty.images.shape == (0, 1, 2, 2)
    with pytest.raises(ValueError, match="unknown contributor 'zed'"):
        data.subset(["a", "zed"])


def test_invalid_data_is_refused_naming_the_item():
    images = np.zeros((2, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="item id 'x' occurs 2 times"):
        ContributorData(images, np.array(["a", "b"]), np.array(["x", "x"]))
    with pytest.raises(ValueError, match=r"invalid contributor id 'b c' \(item 'y'\)"):
        ContributorData(images, np.array(["a", "b c"]), np.array(["x", "y"]))
    with pytest.raises(ValueError, match="contributors has 1 entries but there are 2 images"):
        ContributorData(images, np.array(["a"]), np.array(["x", "y"]))


def test_save_load_round_trip_is_exact(tmp_path, digits):
    for data in (digits, small_data(["a", "b"])):
        data.save(tmp_path / "d.npz")
        back = ContributorData.load(tmp_path / "d.npz")
        for name in ("images", "contributors", "item_ids"):
            np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
        assert (back.labels is None) == (data.labels is None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]  # no temporary file left behind


def write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_image_folder_reads_grayscale_scaled_to_unit_range(tmp_path):
    write_png(tmp_path / "black.png", np.zeros((3, 4), np.uint8))
    write_png(tmp_path / "white.png", np.full((3, 4), 255, np.uint8))
    manifest = write_tsv(
        tmp_path / "m.tsv", [{"path": "black.png", "contributor": "a"}, {"path": "white.png", "contributor": "b"}]
    )
    data = load_image_folder(manifest)
    assert data.images.shape == (2, 1, 3, 4)
    assert data.images[0].max() == -1.0 and data.images[1].min() == 1.0
    assert list(data.item_ids) == ["black.png", "white.png"] and data.labels is None


def test_image_folder_mixes_grayscale_into_rgb(tmp_path):
    write_png(tmp_path / "g.png", np.zeros((2, 2), np.uint8))
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 255
    write_png(tmp_path / "c.png", rgb)
    manifest = write_tsv(tmp_path / "m.tsv", [{"path": name, "contributor": "a"} for name in ("g.png", "c.png")])
    images = load_image_folder(manifest).images
    assert images.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(images[1, :, 0, 0], [1.0, -1.0, -1.0])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", r"line 3: cannot read image '.*missing\.png'"),
        ("unreadable", r"line 3: cannot read image '.*broken\.png'"),
        ("size", r"line 3: image 'big\.png' is 4×4 but 'ok\.png' is 2×2"),
        ("empty", r"line 3: empty 'contributor'"),
    ],
)
def test_image_folder_errors_name_the_item(tmp_path, setup, message):
    write_png(tmp_path / "ok.png", np.zeros((2, 2), np.uint8))
    write_png(tmp_path / "big.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "broken.png").write_text("not an image")
    second = {"missing": "missing.png", "unreadable": "broken.png", "size": "big.png", "empty": "big.png"}[setup]
    manifest = write_tsv(
        tmp_path / "m.tsv",
        [{"path": "ok.png", "contributor": "a"}, {"path": second, "contributor": "" if setup == "empty" else "b"}],
    )
    with pytest.raises(ValueError, match=message):
        load_image_folder(manifest)


@pytest.mark.parametrize(
    ("images", "shape"),
    [
        (np.full((2, 3, 5), 255, np.uint8), (2, 1, 3, 5)),
        (np.full((2, 5, 6, 3), 255, np.uint8), (2, 3, 5, 6)),
        (np.ones((2, 3, 5, 6), np.float32), (2, 3, 5, 6)),
    ],
)
def test_load_arrays_layouts(tmp_path, images, shape):
    np.savez(tmp_path / "a.npz", images=images, contributors=np.array(["a", "b"]))
    data = load_arrays(tmp_path / "a.npz")
    assert data.images.shape == shape and data.images.min() == 1.0
    assert list(data.item_ids) == ["item-000000", "item-000001"]


def test_load_arrays_refuses_out_of_range_floats_and_missing_keys(tmp_path):
    images = np.zeros((3, 2, 2), np.float32)
    images[2, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", images=images, contributors=np.array(["a"] * 3))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\] \(item 2 does not\)"):
        load_arrays(tmp_path / "nan.npz")
    np.savez(tmp_path / "nocontrib.npz", images=images)
    with pytest.raises(ValueError, match="missing array 'contributors'"):
        load_arrays(tmp_path / "nocontrib.npz")


def test_load_source_npz_with_manifest_and_unknown_source(tmp_path):
    small_data(["a", "b", "a"]).save(tmp_path / "d.npz")
    manifest = write_tsv(tmp_path / "m.tsv", [{"item": f"i{k}", "contributor": "z"} for k in range(3)])
    assert load_source("npz", tmp_path / "d.npz", manifest).contributor_ids == ["z"]
    with pytest.raises(ValueError, match="unknown data source 'csv'"):
        load_source("csv")


def test_split_heldout_is_stratified_and_keeps_every_contributor(digits):
    data = ContributorData(digits.images[:101], np.array(["big"] * 100 + ["solo"]), digits.item_ids[:101])
    train, heldout = split_heldout(data, 0.2, seed=1)
    assert heldout.counts().to_dict() == {"big": 20}
    assert train.counts().to_dict() == {"big": 80, "solo": 1}
    assert sorted([*train.item_ids, *heldout.item_ids]) == sorted(data.item_ids)
    again, _ = split_heldout(data, 0.2, seed=1)
    other, _ = split_heldout(data, 0.2, seed=2)
    assert list(again.item_ids) == list(train.item_ids) != list(other.item_ids)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\), got 1.0"):
        split_heldout(data, 1.0, seed=1)


def test_write_manifest(tmp_path):
    write_manifest(small_data(["b", "a", "b"]), tmp_path / "c.tsv")
    assert (tmp_path / "c.tsv").read_text() == "contributor\tn_items\nb\t2\na\t1\n"


def test_contributor_ids_match_the_loaded_data_without_reading_images(tmp_path):
    assert contributor_ids("digits") == load_digits().contributor_ids
    manifest = write_tsv(
        tmp_path / "m.tsv",
        [
            {"path": "never-read.png", "contributor": "b"},
            {"path": "also-absent.png", "contributor": "a"},
            {"path": "third.png", "contributor": "b"},
        ],
    )
    assert contributor_ids("folder", manifest=manifest) == ["b", "a"]
    bad = write_tsv(tmp_path / "bad.tsv", [{"path": "x.png", "contributor": "a/b"}])
    with pytest.raises(ValueError, match="'a/b'"):
        contributor_ids("folder", manifest=bad)


def test_missing_manifest_is_named_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest '.*absent.tsv' not found.*columns path, contributor"):
        contributor_ids("folder", manifest=tmp_path / "absent.tsv")


# --- the trusted reference and the marketplace -------------------------------------------------------------------


@pytest.fixture(scope="module")
def market():
    return load_marketplace()


def test_marketplace_plants_every_case_and_never_shares_an_item_with_its_reference(market):
    data, reference = market
    assert data.contributor_ids == [
        "digit0",
        "digit1",
        "digit2",
        "digit3",
        "digit4",
        "dup2",
        "few4",
        "noisy3",
        "blurred1",
        "glyphs",
        "noise",
    ]
    counts = data.counts()
    assert counts["few4"] == 6 and counts.drop("few4").min() >= 100
    assert data.labels is None and set(reference.contributors) == {REFERENCE_OWNER}
    assert sorted(np.unique(reference.labels)) == [0, 1, 2, 3, 4] and len(reference) == 360
    np.testing.assert_array_equal(data.subset(["dup2"]).images, data.subset(["digit2"]).images)
    assert not set(image_digests(reference.images)) & set(image_digests(data.images))  # not even a copy
    assert not set(reference.item_ids) & set(data.item_ids)
    clean3, noisy3 = data.subset(["digit3"]).images, data.subset(["noisy3"]).images
    assert 0.3 < np.abs(noisy3 - clean3).mean() < 0.6  # sd 0.6 noise, clipped to [-1, 1]
    blurred = data.subset(["blurred1"]).images
    sharpness = [np.abs(np.diff(images, axis=3)).mean() for images in (blurred, data.subset(["digit1"]).images)]
    assert sharpness[0] < 0.75 * sharpness[1]  # a 1-pixel Gaussian blur: a third less contrast between neighbours
    glyphs = data.subset(["glyphs"]).images
    assert len(set(image_digests(glyphs))) == len(glyphs) and glyphs.max() == 1.0 and glyphs.min() == -1.0
    again, _ = load_marketplace()
    np.testing.assert_array_equal(again.images, data.images)  # a fixed construction
    assert contributor_ids("marketplace") == data.contributor_ids
    with pytest.raises(ValueError, match="leave path and manifest null"):
        load_source("marketplace", path="x.npz")


def test_load_reference_from_each_source(tmp_path, digits):
    subset = write_tsv(tmp_path / "ref.tsv", [{"item": "digits-0003"}, {"item": "digits-0001"}])
    ref = load_reference("digits", manifest=subset)
    assert ref.item_ids.tolist() == ["digits-0001", "digits-0003"] and ref.labels.tolist() == [1, 3]
    assert set(ref.contributors) == {REFERENCE_OWNER}
    np.savez(tmp_path / "ref.npz", images=np.zeros((3, 8, 8), np.uint8))  # no contributors array needed
    assert load_reference("npz", path=tmp_path / "ref.npz").images.shape == (3, 1, 8, 8)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    assert len(load_reference("folder", manifest=write_tsv(tmp_path / "f.tsv", [{"path": "a.png"}]))) == 1
    assert len(load_reference("marketplace")) == 360
    with pytest.raises(ValueError, match="unknown item 'digits-9999'"):
        load_reference("digits", manifest=write_tsv(tmp_path / "bad.tsv", [{"item": "digits-9999"}]))
    with pytest.raises(ValueError, match="unknown reference source 'web'"):
        load_reference("web")


def test_bad_references_are_named_with_the_fix(digits):
    train = digits.subset(["digit0", "digit1"])
    empty = ContributorData(np.zeros((0, 1, 8, 8), np.float32), np.array([], str), np.array([], str))
    with pytest.raises(ValueError, match=r"has no images.*data.reference"):
        check_reference(empty, train)
    big = ContributorData(np.zeros((2, 1, 16, 16), np.float32), np.array(["r", "r"]), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="1-channel 16x16 but the training images are 1-channel 8x8"):
        check_reference(big, train)
    rgb = ContributorData(np.zeros((2, 3, 8, 8), np.float32), np.array(["r", "r"]), np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"3-channel 8x8 .* 1-channel 8x8: convert"):
        check_reference(rgb, train)


def test_a_reference_overlapping_the_training_items_is_counted_by_content(digits):
    train = digits.subset(["digit0", "digit1", "digit2"])
    # 3 renamed copies of digit1 items and 1 of digit0 among 10 reference images; the rest are digit5 items.
    images = np.concatenate(
        [train.subset(["digit1"]).images[:3], train.subset(["digit0"]).images[:1], digits.subset(["digit5"]).images[:6]]
    )
    reference = ContributorData(images, np.full(10, REFERENCE_OWNER), np.array([f"r{i}" for i in range(10)]))
    warning = check_reference(reference, train)
    assert warning.startswith("4 of 10 reference images (40.0%) are exact copies of training items")
    assert "digit1 (3), digit0 (1)" in warning
    assert check_reference(digits.subset(["digit5"]), train) is None


def test_the_yardstick_is_named_and_a_marketplace_refuses_the_held_out_split():
    assert yardstick({"source": "marketplace"}, marketplace=True) == TRUSTED
    assert yardstick(None) == HELDOUT
    with pytest.raises(ValueError, match=r"marketplace: true needs a trusted reference.*set data.reference"):
        yardstick(None, marketplace=True)


def test_prepare_data_with_a_reference_trains_on_every_item_and_logs_the_yardstick(tmp_path):
    from diffcredit.stages import prepare_data

    outputs = {
        "train_out": str(tmp_path / "train.npz"),
        "heldout_out": str(tmp_path / "heldout.npz"),
        "contributors_out": str(tmp_path / "contributors.tsv"),
    }
    messages = []
    prepare_data(
        source="digits",
        path=None,
        manifest=None,
        heldout_fraction=0.2,
        seed=0,
        reference={"source": "marketplace"},
        log=messages.append,
        **outputs,
    )
    train, heldout = (ContributorData.load(outputs[k]) for k in ("train_out", "heldout_out"))
    assert len(train) == 1797 and len(heldout) == 360 and set(heldout.contributors) == {REFERENCE_OWNER}
    assert messages[0].startswith("warning: 360 of 360 reference images (100.0%) are exact copies")
    assert messages[1].startswith("yardstick: trusted reference, 360 images (marketplace)")
    messages.clear()
    prepare_data(
        source="digits", path=None, manifest=None, heldout_fraction=0.2, seed=0, log=messages.append, **outputs
    )
    assert messages == [f"yardstick: contributors' held-out items. Warning: {UNTRUSTED_NOTE}"]
    with pytest.raises(ValueError, match="marketplace: true needs a trusted reference"):
        prepare_data(
            source="digits", path=None, manifest=None, heldout_fraction=0.2, seed=0, marketplace=True, **outputs
        )


def _market_values(**overrides: tuple[float, float, float]) -> pd.DataFrame:
    """Hand-made values of the marketplace's contributors: clean ones at 10 ± 1, corrupted ones at 0 ± 1."""
    rows = {c: (10.0, 9.0, 11.0) for c in (*MARKETPLACE_CLEAN, "dup2", "few4")}
    rows.update({c: (0.0, -1.0, 1.0) for c in MARKETPLACE_CORRUPTED})
    rows.update(overrides)
    return pd.DataFrame(rows, index=["value", "ci_low", "ci_high"]).T


def test_marketplace_expectations_hold_fail_and_name_what_is_missing():
    assert marketplace_expectations(_market_values()) == {"corrupted_below_clean": True, "duplicate_equal": True}
    # The noise contributor above one clean class, and a duplicate whose interval misses its original's.
    wrong = marketplace_expectations(_market_values(noise=(10.5, 10.0, 11.0), dup2=(5.0, 4.0, 6.0)))
    assert wrong == {"corrupted_below_clean": False, "duplicate_equal": False}
    no_intervals = _market_values()[["value"]]
    assert marketplace_expectations(no_intervals)["duplicate_equal"] is None
    with pytest.raises(ValueError, match="no value for glyphs, noise"):
        marketplace_expectations(_market_values().drop(["glyphs", "noise"]))
