"""Properties: FID/KID sanity on real digits, exact IS and entropy cases, orientation, local extractors, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import entropy
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from diffcredit.properties import (
    PROPERTY_NAMES,
    Property,
    load_property,
    oriented,
    prepare_reference,
    reference_provenance,
)
from diffcredit.properties.diversity import assign_ward, cluster_means, proportion_entropy, ward_clusters
from diffcredit.properties.features import (
    extract_features,
    load_classifier,
    save_classifier,
    train_classifier,
)
from diffcredit.properties.inception_score import inception_score
from diffcredit.properties.precision_recall import SCORES, knn_radii, manifold_scores

CLASSIFIER_STEPS = 200
FAST_KID = {"num_subsets": 10}  # clean-fid's 100 subsets cost seconds per call on a shared core


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits in [-1, 1], split 70/30 (stratified) into training and held-out reference images."""
    data = load_digits()
    images = (data.images[:, None] / 8 - 1).astype(np.float32)
    x_train, x_ref, y_train, y_ref = train_test_split(
        images, data.target, test_size=0.3, random_state=0, stratify=data.target
    )
    return x_train, y_train, x_ref, y_ref


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    x_train, y_train, x_ref, y_ref = digits
    out = tmp_path_factory.mktemp("reference")
    prepare_reference(
        out,
        train_images=x_train,
        train_labels=y_train,
        reference_images=x_ref,
        seed=0,
        classifier_steps=CLASSIFIER_STEPS,
        reference_labels=y_ref,
    )
    return out


@pytest.fixture(scope="module")
def noise(digits):
    return np.random.default_rng(1).uniform(-1, 1, size=digits[0].shape).astype(np.float32)


@pytest.fixture(scope="module")
def linear_head(reference, tmp_path_factory):
    """A safetensors aesthetic predictor that scores an image by its first feature."""
    path = tmp_path_factory.mktemp("aesthetic") / "head.safetensors"
    weight = torch.zeros(1, 64)
    weight[0, 0] = 1.0
    save_file({"weight": weight, "bias": torch.tensor([0.5])}, path)
    return path


def test_classifier_is_accurate_on_held_out_digits(reference):
    info = json.loads((reference / "reference.json").read_text())
    assert info["extractor"] == "classifier" and info["feature_dim"] == 64
    assert info["reference_accuracy"] >= 0.95


def test_same_seed_gives_identical_classifier_and_another_seed_does_not(digits):
    x, y = digits[0][:256], digits[1][:256]
    first, again, other = (train_classifier(x, y, seed=s, steps=5) for s in (7, 7, 8))
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert not torch.equal(first.head[-1].weight, other.head[-1].weight)


def test_classifier_round_trips_through_safetensors_and_json(digits, tmp_path):
    model = train_classifier(digits[0][:256], digits[1][:256], seed=0, steps=5, feature_dim=16)
    save_classifier(model, tmp_path / "clf.safetensors")
    loaded = load_classifier(tmp_path / "clf.safetensors")
    assert loaded.config == model.config
    np.testing.assert_array_equal(extract_features(loaded, digits[2]), extract_features(model, digits[2]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.json", "clf.safetensors"]  # no temporary left behind


def test_fid_of_real_digits_is_small_and_of_noise_large(reference, digits, noise):
    fid = load_property("fid", reference)
    real, random = fid(digits[0]), fid(noise)
    assert real < random / 20
    assert fid(digits[2]) == pytest.approx(0.0, abs=1e-6)  # the reference set against its own statistics


@pytest.mark.parametrize("name", ["fid", "kid"])
def test_distance_grows_with_the_share_of_noise(reference, digits, noise, name):
    distance = load_property(name, reference, **(FAST_KID if name == "kid" else {}))
    values = [distance(((1 - a) * digits[0] + a * noise).astype(np.float32)) for a in (0.0, 0.3, 0.6, 1.0)]
    assert np.all(np.diff(values) > 0), values


def test_kid_is_near_zero_for_the_same_distribution(reference, digits, noise):
    kid = load_property("kid", reference, **FAST_KID)
    assert abs(kid(digits[0])) < kid(noise) / 20


@pytest.mark.parametrize("name", ["fid", "kid", "inception_score", "diversity"])
def test_same_inputs_give_the_same_value(reference, digits, name):
    images, options = digits[0][:300], FAST_KID if name == "kid" else {}
    first = load_property(name, reference, **options)(images)
    np.random.seed(123)  # KID must not depend on the global numpy state
    assert load_property(name, reference, **options)(images) == first


def test_inception_score_planted_cases():
    confident = torch.log_softmax(50 * torch.eye(10, dtype=torch.float64), dim=1).numpy()
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-9)
    assert inception_score(np.repeat(confident[:1], 7, axis=0)) == pytest.approx(1.0)
    # Two images, p(y) uniform: IS = exp(mean KL(p(y|x) || p(y))), each KL from scipy.
    probs = np.array([[0.9, 0.1], [0.1, 0.9]])
    expected = math.exp(np.mean([entropy(row, [0.5, 0.5]) for row in probs]))
    assert inception_score(np.log(probs)) == pytest.approx(expected, rel=1e-12)


def test_inception_score_of_real_digits_is_near_the_number_of_classes(reference, digits):
    score = load_property("inception_score", reference)
    x_train, y_train = digits[0], digits[1]
    assert 7.5 < score(x_train) <= 10.0
    assert score(x_train[y_train == 3]) < 1.2


def test_proportion_entropy_exact_cases():
    assert proportion_entropy(np.full(50, 3), 10) == 0.0
    assert proportion_entropy(np.repeat(np.arange(10), 7), 10) == pytest.approx(math.log2(10), rel=1e-12)
    assert proportion_entropy(np.array([0, 0, 1, 1]), 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"bins 0\.\.9"):
        proportion_entropy(np.array([0, 10]), 10)


def test_diversity_of_one_class_is_zero_and_of_balanced_digits_log2_10(reference, digits):
    diversity = load_property("diversity", reference)
    x_train, y_train = digits[0], digits[1]
    balanced = np.concatenate([x_train[y_train == k][:30] for k in range(10)])
    assert diversity(x_train[y_train == 0]) < 0.1
    assert diversity(balanced) == pytest.approx(math.log2(10), abs=0.05)


@pytest.mark.parametrize("clustering", ["ward", "kmeans"])
def test_cluster_diversity_uses_the_reference_clusters(reference, digits, clustering):
    diversity = load_property("diversity", reference, bins="clusters", clustering=clustering)
    # the reference spreads over most of the 20 clusters (log2 20 = 4.32; Ward's clusters are less even in size)
    assert diversity(digits[2]) > 3.2
    assert diversity(digits[0][digits[1] == 0]) < 2.0


def test_ward_clusters_recover_a_hand_made_clustering():
    """Three groups along three axes (dot products ~1 within, ~0 across): Ward on max(sim) − sim cuts them apart,
    and new points go to the group whose axis they lie on."""
    rng = np.random.default_rng(0)
    group = np.repeat([0, 1, 2, 0, 2], [5, 7, 4, 3, 2])  # interleaved, so the cut cannot follow the input order
    features = np.eye(3)[group] + 0.05 * rng.standard_normal((len(group), 3))
    labels = ward_clusters(features, 3)
    assert len(set(zip(labels, group, strict=True))) == 3  # the same partition, whatever the cluster numbering
    means = cluster_means(features, labels)
    new = np.eye(3)[[2, 2, 1, 0]] + 0.05 * rng.standard_normal((4, 3))
    assert list(assign_ward(new, means)) == [labels[group == g][0] for g in (2, 2, 1, 0)]
    assert proportion_entropy(assign_ward(new, means), 3) == pytest.approx(1.5)  # proportions 1/2, 1/4, 1/4


def test_ward_assignment_is_the_smallest_mean_dissimilarity():
    """The paper assigns each generated image to the cluster whose reference members have the smallest mean
    max(sim) − sim; the cluster mean with the largest dot product is the same cluster."""
    rng = np.random.default_rng(1)
    reference, generated = rng.standard_normal((60, 8)), rng.standard_normal((40, 8))
    labels = ward_clusters(reference, 6)
    similarity = reference @ reference.T
    dissimilarity = similarity.max() - generated @ reference.T
    brute = np.array([[d[labels == k].mean() for k in range(6)] for d in dissimilarity]).argmin(axis=1)
    np.testing.assert_array_equal(assign_ward(generated, cluster_means(reference, labels)), brute)


def test_diversity_names_an_unknown_clustering(reference):
    with pytest.raises(ValueError, match="clustering='dbscan'"):
        load_property("diversity", reference, bins="clusters", clustering="dbscan")
    with pytest.raises(ValueError, match="n_clusters=7"):
        ward_clusters(np.eye(3), 7)


def test_aesthetic_is_the_quantile_of_the_predictor_scores(reference, digits, linear_head):
    images = digits[0][:200]
    features = extract_features(load_classifier(reference / "classifier.safetensors"), images)
    aesthetic = load_property("aesthetic", reference, predictor=linear_head, quantile=0.75)
    assert aesthetic(images) == pytest.approx(np.quantile(features[:, 0] + 0.5, 0.75), rel=1e-6)


def test_aesthetic_accepts_a_torchscript_predictor(reference, digits, linear_head, tmp_path):
    head = torch.nn.Linear(64, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = 1.0
        head.bias.fill_(0.5)
    torch.jit.save(torch.jit.script(head), tmp_path / "head.pt")
    images = digits[0][:200]
    from_script = load_property("aesthetic", reference, predictor=tmp_path / "head.pt")(images)
    assert from_script == pytest.approx(load_property("aesthetic", reference, predictor=linear_head)(images))


def test_orientation_makes_higher_better(reference, tmp_path, linear_head):
    assert oriented(12.5, higher_is_better=False) == -12.5
    assert oriented(3.0, higher_is_better=True) == 3.0
    options = {"aesthetic": {"predictor": linear_head}}
    for name in PROPERTY_NAMES:
        prop = load_property(name, reference, **options.get(name, {}))
        assert isinstance(prop, Property) and prop.name == name
        assert prop.higher_is_better is (name not in ("fid", "kid"))


def test_a_local_exported_extractor_replaces_the_classifier(digits, tmp_path):
    x_train, _, x_ref, _ = digits
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh())
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)), tmp_path / "net.pt2"
    )
    out = tmp_path / "ref"
    prepare_reference(
        out,
        train_images=x_train,
        train_labels=None,
        reference_images=x_ref,
        seed=0,
        n_clusters=5,
        extractor=tmp_path / "net.pt2",
    )
    assert (out / "extractor.pt2").is_file() and not (out / "classifier.safetensors").exists()
    assert load_property("fid", out)(x_ref) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < load_property("diversity", out)(x_ref) <= math.log2(5)  # clusters, as there are no classes
    with pytest.raises(ValueError, match="class probabilities"):
        load_property("inception_score", out)


def test_unlabelled_data_without_extractor_is_refused(digits, tmp_path):
    with pytest.raises(ValueError, match="extractor=<local TorchScript"):
        prepare_reference(tmp_path, train_images=digits[0], train_labels=None, reference_images=digits[2], seed=0)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 8, 8), np.float32), r"shape \(4, 8, 8\).*channel axis"),
        (np.zeros((4, 3, 8, 8), np.float32), "3 channels.*expects 1"),
        (np.zeros((4, 1, 16, 16), np.float32), "16x16.*expects 8x8"),
        (np.zeros((0, 1, 8, 8), np.float32), "empty"),
        (np.full((4, 1, 8, 8), 200.0, np.float32), r"\[200, 200\].*scale them to \[-1, 1\]"),
        ([[0.0]], "numpy array"),
    ],
)
def test_bad_images_are_refused_with_the_fix(reference, images, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_property("fid", reference)(images)


def test_nan_images_are_refused_naming_the_first_bad_index(reference, digits):
    images = digits[0][:5].copy()
    images[2, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="first: index 2"):
        load_property("diversity", reference)(images)


def test_fid_needs_two_images(reference, digits):
    with pytest.raises(ValueError, match="at least 2"):
        load_property("fid", reference)(digits[0][:1])


def test_missing_or_misnamed_reference_inputs_are_refused(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="run prepare_reference"):
        load_property("fid", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown property 'is'.*inception_score"):
        load_property("is", reference)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['quantile'\] for property 'fid'"):
        load_property("fid", reference, quantile=0.5)
    with pytest.raises(ValueError, match="needs predictor="):
        load_property("aesthetic", reference)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_property("aesthetic", reference, predictor=tmp_path / "missing.pt")


def test_malformed_predictor_is_refused(reference, tmp_path):
    save_file({"weight": torch.ones(2, 64)}, tmp_path / "two_heads.safetensors")
    with pytest.raises(ValueError, match=r"linear head.*'weight': \(2, 64\)"):
        load_property("aesthetic", reference, predictor=tmp_path / "two_heads.safetensors")


@pytest.mark.slow
def test_samples_of_a_briefly_trained_model_fall_between_real_and_noise(reference, digits, noise):
    models = pytest.importorskip("diffcredit.models")
    training = pytest.importorskip("diffcredit.training")
    sampling = pytest.importorskip("diffcredit.sampling")
    model = models.build_model(models.digits_unet_config(), seed=0)
    training.train(model, digits[0], steps=300, batch_size=64, lr=1e-3, seed=0)
    samples = sampling.generate(model, 256, seed=0, inference_steps=50)
    fid = load_property("fid", reference)
    assert fid(digits[0]) < fid(samples) < fid(noise)


# --- precision, recall, density, coverage ------------------------------------------------------------------------


def test_manifold_scores_hand_computed():
    # 1-d features, k = 1. Reference radii: 0 -> 4, 4 -> 4, 12 -> 8; generated radii: 1 -> 1, 2 -> 1, 80 -> 78.
    # Balls of the reference hold generated 1 and 2 (twice each), none holds 80: precision 2/3, density 4/3.
    # Reference 0, 4 have a generated image within their radius, 12 (nearest 2, at 10 > 8) not: coverage 2/3.
    # The outlier 80's ball (78) holds every reference image: recall 1, the inflation coverage is immune to.
    reference, generated = np.array([[0.0], [4.0], [12.0]]), np.array([[1.0], [2.0], [80.0]])
    np.testing.assert_array_equal(knn_radii(reference, 1), [4.0, 4.0, 8.0])
    scores = manifold_scores(reference, generated, k=1)
    assert scores == {"precision": 2 / 3, "recall": 1.0, "density": 4 / 3, "coverage": 2 / 3}


def test_manifold_scores_of_the_reference_itself():
    features = np.random.default_rng(0).normal(size=(50, 3))
    scores = manifold_scores(features, features, k=3)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert scores["density"] == pytest.approx(4 / 3)  # each ball holds its own centre and its 3 neighbours
    with pytest.raises(ValueError, match="k=50 nearest neighbours need more than k points"):
        knn_radii(features, 50)


def test_manifold_properties_separate_quality_from_coverage(reference, digits, noise):
    x_train, y_train = digits[0], digits[1]
    one_class = x_train[y_train == 3]
    score = {name: load_property(name, reference, k=5) for name in SCORES}
    assert all(score[name].higher_is_better for name in SCORES)
    # One well-drawn class: realistic (high precision and density) but covering about a tenth of the reference.
    assert score["precision"](one_class) > 0.9 and score["density"](one_class) > 0.9
    assert score["coverage"](one_class) < 0.2 and score["recall"](one_class) < 0.2
    # the training digits cover (almost) every reference digit: 1.0 on an AMD EPYC, 0.998 (1 of 540) on an Intel
    # Xeon, whose kernels train the classifier behind the features to slightly other weights
    assert score["coverage"](x_train) > 0.99 and score["recall"](x_train) > 0.8
    # Noise: density and coverage fall to almost nothing; precision only halves, because a few outlying reference
    # digits have balls large enough to hold noise (measured 0.46 here), which is why density is the quality to use.
    assert score["density"](noise) < 0.2 * score["density"](x_train) and score["coverage"](noise) < 0.1
    assert 0.2 < score["precision"](noise) < 0.7


# --- a trusted reference: a yardstick the contributors cannot move ----------------------------------------------


def _stages_reference(
    tmp_path, contributors: np.ndarray, name: str, reference: dict | None, labels: str = "items", classes: int = 5
):
    """The workflow's two data stages on `contributors` (5 contributors of 8x8 images, item labels 0..classes-1);
    returns the folder."""
    from diffcredit import stages

    folder = tmp_path / name
    folder.mkdir()
    owners = np.array([f"c{i % 5}" for i in range(len(contributors))])
    item_labels = np.arange(len(owners)) // 5 % classes
    np.savez(folder / "items.npz", images=contributors, contributors=owners, labels=item_labels)
    files = {
        "train_out": str(folder / "train.npz"),
        "heldout_out": str(folder / "heldout.npz"),
        "contributors_out": str(folder / "contributors.tsv"),
    }
    stages.prepare_data(
        source="npz",
        path=str(folder / "items.npz"),
        manifest=None,
        heldout_fraction=0.2,
        seed=0,
        reference=reference,
        log=lambda message: None,
        **files,
    )
    stages.prepare_reference(
        train_data=None if reference else files["train_out"],
        heldout_data=files["heldout_out"],
        out=str(folder / "reference"),
        seed=0,
        extractor=None,
        classifier_steps=30,
        feature_dim=16,
        reference=reference,
        labels=labels,
        log=lambda message: None,
    )
    return folder / "reference"


@pytest.fixture(scope="module")
def buyer(digits, tmp_path_factory):
    """The buyer's reference: 200 labelled held-out digits in an npz; and two different sets of contributor items."""
    folder = tmp_path_factory.mktemp("buyer")
    x_ref, y_ref = digits[2][:200], digits[3][:200]
    np.savez(folder / "buyer.npz", images=x_ref, labels=y_ref)
    clean = digits[0][:300]
    garbage = clean.copy()
    garbage[:60] = np.random.default_rng(5).uniform(-1, 1, size=garbage[:60].shape)  # one contributor uploads noise
    return {"source": "npz", "path": str(folder / "buyer.npz")}, clean, garbage


def test_the_yardstick_cannot_move_when_a_contributor_changes_its_items(buyer, digits, noise, tmp_path):
    spec, clean, garbage = buyer
    first = _stages_reference(tmp_path, clean, "clean", spec)
    second = _stages_reference(tmp_path, garbage, "garbage", spec)
    for name in ("classifier.safetensors", "classifier.json", "reference.npz"):  # the extractor never saw the items
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    samples = np.concatenate([digits[0][:100], noise[:20]])
    for name in ("fid", "coverage", "precision", "diversity"):
        assert load_property(name, first)(samples) == load_property(name, second)(samples), name
    info = json.loads((first / "reference.json").read_text())
    assert info["yardstick"] == "trusted reference" and info["source"] == spec
    assert info["n_fit"] + info["n_reference"] == 200 and 95 < info["n_fit"] < 105  # half of each label
    assert info["extractor_fit"] == (
        f"{info['n_fit']} reference images and labels, disjoint from the {info['n_reference']} images of the statistics"
    )
    assert reference_provenance(first)["trusted"] is True


def test_without_a_reference_the_contributors_move_the_yardstick_and_it_says_so(buyer, tmp_path):
    _, clean, garbage = buyer
    first = _stages_reference(tmp_path, clean, "clean", None)
    second = _stages_reference(tmp_path, garbage, "garbage", None)
    assert (first / "classifier.safetensors").read_bytes() != (second / "classifier.safetensors").read_bytes()
    provenance = reference_provenance(first)
    assert provenance["yardstick"] == "contributors' held-out items" and provenance["trusted"] is False
    assert provenance["statement"].startswith("Warning: the contributors shape their own yardstick")


def test_the_extractor_can_learn_to_tell_contributors_apart(buyer, tmp_path):
    """features.labels: contributors trains the classifier on each item's contributor (5) instead of its label (3)."""
    _, clean, _ = buyer
    by_items = _stages_reference(tmp_path, clean, "items", None, classes=3)
    by_contributors = _stages_reference(tmp_path, clean, "contributors", None, labels="contributors", classes=3)
    assert load_classifier(by_items / "classifier.safetensors").config.num_classes == 3
    assert load_classifier(by_contributors / "classifier.safetensors").config.num_classes == 5
    with pytest.raises(ValueError, match="a trusted reference"):
        _stages_reference(tmp_path, clean, "trusted", buyer[0], labels="contributors")


def test_an_unlabelled_trusted_reference_fits_the_extractor_on_pseudo_labels(digits, tmp_path):
    prepare_reference(
        tmp_path,
        reference_images=digits[2][:120],
        seed=0,
        trusted=True,
        classifier_steps=20,
        feature_dim=16,
        n_clusters=6,
    )
    info = json.loads((tmp_path / "reference.json").read_text())
    assert info["extractor_fit"] == (
        f"{info['n_fit']} reference images, k-means pseudo-labels (6 clusters), "
        f"disjoint from the {info['n_reference']} images of the statistics"
    )
    assert info["n_fit"] + info["n_reference"] == 120
    assert load_classifier(tmp_path / "classifier.safetensors").config.num_classes == 6
    assert 0.0 < load_property("inception_score", tmp_path)(digits[0][:100]) <= 6.0


def test_a_trusted_reference_refuses_contributor_items_and_an_empty_reference(digits, tmp_path):
    with pytest.raises(ValueError, match="do not pass train_images"):
        prepare_reference(tmp_path, reference_images=digits[2], train_images=digits[0], seed=0, trusted=True)
    with pytest.raises(ValueError, match="the reference has no images"):
        prepare_reference(tmp_path, reference_images=digits[2][:0], seed=0, trusted=True)
