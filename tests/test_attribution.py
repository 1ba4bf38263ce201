"""Non-Shapley attribution on tiny seeded UNets: planted answers, brute-force gradients, ensemble codes and ablation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from diffcredit.attribution import contributor_totals, detached_params, save_values
from diffcredit.attribution import dtrak, ensembles, inrun
from diffcredit.attribution.ensembles import AveragedEnsemble, ablation_table, encode, members_without
from diffcredit.contributors import ContributorData, load_digits
from diffcredit.models import build_model, make_scheduler
from diffcredit.sampling import generate
from diffcredit.training import train

SCHEDULE = {"num_train_timesteps": 100}


@pytest.fixture(scope="module")
def all_digits() -> np.ndarray:
    return load_digits().images


@pytest.fixture(scope="module")
def planted(all_digits: np.ndarray) -> tuple[ContributorData, np.ndarray]:
    """Contributor ``copy`` holds exact copies of the targets, ``noise`` uniform noise, ``other`` other digits."""
    targets = all_digits[:6]
    noise = np.random.default_rng(0).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    images = np.concatenate([targets, noise, all_digits[100:106]])
    data = ContributorData(images, ["copy"] * 6 + ["noise"] * 6 + ["other"] * 6, [f"i{i:02d}" for i in range(18)])
    return data, targets


@pytest.fixture(scope="module")
def new_model(tiny_config: dict) -> Callable[..., torch.nn.Module]:
    """A fresh seeded tiny UNet per call: the methods train or differentiate the model they are given."""
    return lambda seed=0: build_model(tiny_config, seed=seed)


@pytest.fixture(scope="module")
def denoiser(all_digits: np.ndarray, new_model):
    """A tiny model briefly trained on digits: past the phase in which any image, even noise, teaches denoising."""
    model = new_model()
    train(model, all_digits[300:600], steps=40, batch_size=32, lr=1e-3, seed=0, schedule=SCHEDULE, log=lambda m: None)
    return model


def flat_grad(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


# --- shared ---------------------------------------------------------------------------------------------------------


def test_contributor_totals_sum_items_in_contributor_order() -> None:
    data = ContributorData(np.zeros((4, 1, 2, 2), np.float32), ["b", "a", "b", "c"], ["w", "x", "y", "z"])
    totals = contributor_totals(np.array([1.0, 2.0, 3.0, -4.0]), data)
    pd.testing.assert_series_equal(
        totals, pd.Series([4.0, 2.0, -4.0], index=pd.Index(["b", "a", "c"], name="contributor"), name="value")
    )
    with pytest.raises(ValueError, match=r"one score per item \(4\), got shape \(3,\)"):
        contributor_totals(np.ones(3), data)


def test_save_values_writes_contributor_value_rank_and_extras(tmp_path) -> None:
    scores = pd.Series([0.5, 2.0], index=pd.Index(["a", "b"], name="contributor"), name="value")
    save_values(scores, tmp_path / "values.csv", seconds=3.0)
    table = pd.read_csv(tmp_path / "values.csv")
    assert table.to_dict("list") == {"contributor": ["a", "b"], "value": [0.5, 2.0], "seconds": [3.0, 3.0],
                                     "rank": [2, 1]}


# --- D-TRAK ---------------------------------------------------------------------------------------------------------


def test_dtrak_credits_the_copies_of_the_targets(planted, new_model) -> None:
    data, targets = planted
    scores = dtrak.contributor_scores(new_model(), data, targets, projection_dim=64, timesteps=4, seed=0, lam=1e-3,
                                      schedule=SCHEDULE)
    assert list(scores.index) == ["copy", "noise", "other"]
    # The scores are the ridge coefficients writing the mean target feature through the items' features: the
    # target is the mean of the copies' features, so the copies share a total of ~1 and the rest get ~0.
    assert scores["copy"] == pytest.approx(1.0, abs=0.02)
    assert abs(scores["noise"]) < 0.02 and abs(scores["other"]) < 0.02


def test_dtrak_features_are_projected_brute_force_gradients(all_digits, new_model) -> None:
    model = new_model().eval()
    scheduler = make_scheduler("ddpm", SCHEDULE)
    steps = torch.tensor([0, 50, 99])
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    params = detached_params(model)
    projection = dtrak.projection_matrix(params, 16, seed=2)
    got = dtrak.features(model, params, all_digits[:3], projection=projection, timesteps=steps, noise=noise,
                         scheduler=scheduler, batch_size=2)
    stacked = torch.cat([projection[name] for name in params])
    for i, image in enumerate(torch.from_numpy(all_digits[:3])):
        noisy = scheduler.add_noise(image.expand(3, -1, -1, -1), noise, steps)
        loss = model(noisy, steps).sample.pow(2).mean()
        torch.testing.assert_close(got[i], flat_grad(loss, model) @ stacked, rtol=1e-4, atol=1e-6)


def test_dtrak_is_seeded(planted, new_model) -> None:
    data, targets = planted
    options = {"projection_dim": 8, "timesteps": 2, "lam": 1e-2, "schedule": SCHEDULE}
    first = dtrak.contributor_scores(new_model(), data, targets, seed=3, **options)
    pd.testing.assert_series_equal(first, dtrak.contributor_scores(new_model(), data, targets, seed=3, **options))
    assert not np.allclose(first, dtrak.contributor_scores(new_model(), data, targets, seed=4, **options))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lam": 0.0}, "lam=0.0: the relative ridge must be > 0"),
        ({"timesteps": 101}, "timesteps=101 exceeds the schedule's 100 training timesteps"),
        ({"targets": np.zeros((2, 1, 4, 4), np.float32)}, r"targets of shape \(2, 1, 4, 4\) do not match"),
    ],
)
def test_dtrak_refuses_bad_settings(planted, options: dict, message: str, new_model) -> None:
    data, targets = planted
    kwargs = {"targets": targets, "projection_dim": 4, "timesteps": 2, "seed": 0, "lam": 1e-2,
              "schedule": SCHEDULE} | options
    with pytest.raises(ValueError, match=message):
        dtrak.contributor_scores(new_model(), data, **kwargs)


# --- In-Run Data Shapley ------------------------------------------------------------------------------------------


def test_inrun_dot_products_equal_per_example_autograd(all_digits, new_model) -> None:
    model = new_model().double()
    scheduler = make_scheduler("ddpm", SCHEDULE)
    generator = torch.Generator().manual_seed(0)
    clean = torch.from_numpy(all_digits[:4]).double()
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    steps = torch.randint(0, 100, (4,), generator=generator)
    params = detached_params(model)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in params.items()}
    dots = inrun.gradient_dots(model, params, clean, steps, noise, direction, scheduler)
    flat_direction = torch.cat([direction[name].flatten() for name in params])
    for i in range(4):
        noisy = scheduler.add_noise(clean[i : i + 1], noise[i : i + 1], steps[i : i + 1])
        loss = (model(noisy, steps[i : i + 1]).sample - noise[i : i + 1]).pow(2).mean()
        assert dots[i].item() == pytest.approx((flat_grad(loss, model) @ flat_direction).item(), rel=1e-5)


def test_inrun_credits_copies_of_the_validation_images_over_noise(all_digits, denoiser) -> None:
    validation = all_digits[200:212]
    noise = np.random.default_rng(1).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    data = ContributorData(np.concatenate([noise, validation]), ["noise"] * 12 + ["copy"] * 12,
                           [f"i{i:02d}" for i in range(24)])
    scores = inrun.contributor_scores(denoiser, data, validation, steps=12, batch_size=8, lr=0.05, seed=0,
                                      schedule=SCHEDULE, log=lambda message: None)
    assert list(scores.index) == ["noise", "copy"]
    assert scores["copy"] > 0 and scores["copy"] > 2 * abs(scores["noise"])


def test_inrun_credits_only_the_items_of_the_batches_and_is_seeded(all_digits, new_model) -> None:
    images, validation = all_digits[:6], all_digits[50:54]
    options = {"steps": 1, "batch_size": 2, "lr": 0.1, "schedule": SCHEDULE, "log": lambda message: None}
    values = inrun.item_scores(new_model(), images, validation, seed=5, **options)
    assert np.count_nonzero(values) == 2
    np.testing.assert_array_equal(values, inrun.item_scores(new_model(), images, validation, seed=5, **options))
    assert not np.array_equal(values, inrun.item_scores(new_model(), images, validation, seed=6, **options))


def test_inrun_leaves_the_given_model_untouched(all_digits, new_model) -> None:
    model = new_model()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    inrun.item_scores(model, all_digits[:4], all_digits[4:6], steps=1, batch_size=2, lr=1.0, seed=0, schedule=SCHEDULE,
                      log=lambda message: None)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs' for In-Run Data Shapley; use one of sgd, adam"),
        ({"validation_batch_size": 3}, r"validation_batch_size=3: choose 1..2 or None"),
        ({"steps": 0}, "need steps >= 1"),
    ],
)
def test_inrun_refuses_bad_settings(all_digits, options: dict, message: str, new_model) -> None:
    kwargs = {"steps": 1, "batch_size": 2, "lr": 0.1, "seed": 0, "schedule": SCHEDULE} | options
    with pytest.raises(ValueError, match=message):
        inrun.item_scores(new_model(), all_digits[:4], all_digits[4:6], **kwargs)


# --- encoded ensembles ----------------------------------------------------------------------------------------------


def test_codes_are_distinct_balanced_cover_every_member_and_are_seeded() -> None:
    ids = [f"c{i}" for i in range(10)]
    codes = encode(ids, 6, seed=0)
    assert list(codes.index) == ids and list(codes.columns) == list(range(6))
    assert (codes.sum(axis=1) == 3).all()
    assert not codes.duplicated().any()
    assert codes.any(axis=0).all()
    pd.testing.assert_frame_equal(codes, encode(ids, 6, seed=0))
    assert not codes.equals(encode(ids, 6, seed=1))
    # 20 = C(6, 3) contributors use every balanced code exactly once.
    every = encode([f"c{i}" for i in range(20)], 6, seed=0)
    assert {tuple(row) for row in every.to_numpy()} == {
        tuple(row) for row in np.array([[(r >> b) & 1 for b in range(6)] for r in range(64)], bool) if row.sum() == 3
    }


@pytest.mark.parametrize(
    ("ids", "members", "message"),
    [
        (["a", "b"], 5, "n_members=5: use an even number"),
        ([f"c{i}" for i in range(7)], 4, r"7 contributors cannot get distinct codes .* C\(4, 2\) = 6; use more"),
        (["a"], 4, "1 contributors cannot get distinct codes"),
        (["a", "b/c"], 4, "invalid contributor id 'b/c'"),
        (["a", "a"], 4, "contributor ids must be distinct"),
    ],
)
def test_codes_refuse_bad_input(ids: list[str], members: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(ids, members, seed=0)


def test_ensemble_of_one_member_samples_like_the_member(new_model) -> None:
    member = new_model(seed=3)
    options = {"seed": 7, "inference_steps": 4, "schedule": SCHEDULE}
    np.testing.assert_array_equal(generate(AveragedEnsemble([member]), 5, **options), generate(member, 5, **options))


def test_ensemble_prediction_is_the_members_mean(new_model) -> None:
    members = [new_model(seed=s).eval() for s in range(3)]
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 70])
    with torch.no_grad():
        expected = sum(m(x, t).sample for m in members) / 3
        torch.testing.assert_close(AveragedEnsemble(members)(x, t).sample, expected)


class MeanPixel:
    """A property that tells apart the generations of different member sets (their mean pixel)."""

    name = "mean_pixel"
    higher_is_better = False

    def __call__(self, images: np.ndarray) -> float:
        return float(np.mean(images))


def test_ablation_drops_exactly_the_members_that_saw_the_contributor(new_model) -> None:
    members = [new_model(seed=s) for s in range(4)]
    codes = encode(["a", "b", "c"], 4, seed=0)
    options = {"seed": 1, "inference_steps": 3, "schedule": SCHEDULE}
    table = ablation_table(members, codes, MeanPixel(), n_samples=3, log=lambda message: None, **options)
    assert list(table.index) == ["a", "b", "c"] and (table["members_left"] == 2).all()

    def utility(chosen: list[int]) -> float:
        return -float(np.mean(generate(AveragedEnsemble([members[m] for m in chosen]), 3, **options)))

    full = utility([0, 1, 2, 3])
    for contributor in codes.index:
        unseen = [m for m in range(4) if not codes.loc[contributor, m]]
        assert members_without(codes, contributor) == unseen
        assert table.loc[contributor, "utility_ablated"] == pytest.approx(utility(unseen), abs=1e-7)
        assert table.loc[contributor, "value"] == pytest.approx(full - utility(unseen), abs=1e-7)
    with pytest.raises(ValueError, match="3 members given but the codes have 4 columns"):
        ablation_table(members[:3], codes, MeanPixel(), n_samples=3, **options)



def test_codes_round_trip_through_the_workflow_file(tmp_path) -> None:
    pd.DataFrame({"contributor": ["x", "y", "z"], "n_items": [1, 2, 3]}).to_csv(tmp_path / "c.tsv", sep="\t",
                                                                                  index=False)
    ensembles.write_codes(contributors=str(tmp_path / "c.tsv"), n_members=4, seed=2, out=str(tmp_path / "codes.tsv"))
    pd.testing.assert_frame_equal(ensembles.read_codes(tmp_path / "codes.tsv"), encode(["x", "y", "z"], 4, seed=2))

def test_each_contributor_trains_half_of_the_members() -> None:
    codes = encode(["x", "y", "z"], 4, seed=2)
    trained_on = [ensembles.member_contributors(codes, m) for m in range(4)]
    assert all(trained_on)
    assert {c: sum(c in seen for seen in trained_on) for c in "xyz"} == {"x": 2, "y": 2, "z": 2}
