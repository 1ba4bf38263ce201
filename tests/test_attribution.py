"""Non-Shapley attribution on tiny seeded UNets: planted answers, brute-force gradients, ensemble codes and ablation."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from games import reference_shapley
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffcredit.attribution import contributor_totals, detached_params, ensembles, inrun, projection, save_values, trak
from diffcredit.attribution.ensembles import AveragedEnsemble, ablation_table, encode, members_without
from diffcredit.attribution.projection import StreamedProjection
from diffcredit.contributors import ContributorData, load_digits
from diffcredit.families import family_of
from diffcredit.models import build_model, make_scheduler
from diffcredit.sampling import generate
from diffcredit.seeds import derive_seed
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
    train(model, all_digits[300:600], steps=40, batch_size=32, lr=1e-3, seed=0, schedule=SCHEDULE, log_every=0)
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
    assert table.to_dict("list") == {
        "contributor": ["a", "b"],
        "value": [0.5, 2.0],
        "seconds": [3.0, 3.0],
        "rank": [2, 1],
    }


# --- the TRAK family on a streamed projection ---------------------------------------------------------------------


def dense_projection(proj: StreamedProjection) -> torch.Tensor:
    """P built from its definition: block b of tensor j is N(0, 1/k) from derive_seed(seed, "projection", j, b)."""
    rows = []
    for j, numel in enumerate(proj.sizes.values()):
        for b, start in enumerate(range(0, numel, proj.rows)):
            generator = torch.Generator().manual_seed(derive_seed(proj.seed, "projection", j, b))
            rows.append(torch.randn((min(proj.rows, numel - start), proj.dim), generator=generator))
    return torch.cat(rows) / proj.dim**0.5


def test_streamed_projection_equals_the_dense_one(new_model, monkeypatch) -> None:
    monkeypatch.setattr(projection, "BLOCK_ELEMENTS", 8 * 37)  # 37 rows per block: most tensors span many blocks
    params = detached_params(new_model())
    proj = StreamedProjection({name: p.numel() for name, p in params.items()}, 8, seed=3)
    assert proj.rows == 37
    generator = torch.Generator().manual_seed(0)
    grads = {name: torch.randn((3, *p.shape), generator=generator) for name, p in params.items()}
    flat = torch.cat([grads[name].flatten(1) for name in params], dim=1)
    torch.testing.assert_close(proj.project(grads), flat @ dense_projection(proj), rtol=1e-4, atol=1e-4)
    # an item's projection does not depend on the batch it is projected in (up to float32 rounding: BLAS kernels
    # for one row and for several sum in other orders, by 2e-5 relative on an Intel Xeon)
    alone = proj.project({n: g[1:2] for n, g in grads.items()})
    torch.testing.assert_close(alone, proj.project(grads)[1:2], rtol=1e-4, atol=1e-4)
    assert proj.dense_bytes() == 4 * flat.shape[1] * 8 and proj.block_bytes() == 4 * 37 * 8


def test_rademacher_projection_has_entries_plus_minus_one_over_root_k() -> None:
    proj = StreamedProjection({"w": 1000}, 16, seed=0, kind="rademacher")
    ((_, block),) = proj.blocks("w")
    assert set(torch.unique(block * 4).tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="unknown projection kind 'sparse'; use one of gaussian, rademacher"):
        StreamedProjection({"w": 3}, 4, seed=0, kind="sparse")
    with pytest.raises(ValueError, match=r"gradients lack the parameters \['w'\]"):
        proj.project({})


@pytest.mark.parametrize("output", trak.OUTPUTS)
def test_trak_and_dtrak_features_are_projected_autograd_gradients(all_digits, new_model, output: str) -> None:
    model = new_model()
    space = trak.FeatureSpace.build(
        model, (1, 8, 8), projection_dim=16, timesteps=3, seed=2, schedule=SCHEDULE, batch_size=2
    )
    got = space.image_features(all_digits[:3], output)
    dense = dense_projection(space.projection)
    for i, image in enumerate(torch.from_numpy(all_digits[:3])):
        noisy = space.scheduler.add_noise(image.expand(3, -1, -1, -1), space.noise, space.timesteps)
        prediction = model(noisy, space.timesteps).sample
        f = prediction.pow(2).mean() if output == "squared_norm" else (prediction - space.noise).pow(2).mean()
        torch.testing.assert_close(got[i], flat_grad(f, model) @ dense, rtol=1e-4, atol=1e-6)


def test_journey_trak_features_are_autograd_gradients_along_the_sampling_trajectory(new_model) -> None:
    model = new_model()
    space = trak.FeatureSpace.build(model, (1, 8, 8), projection_dim=16, timesteps=3, seed=2, schedule=SCHEDULE)
    pixel = family_of(None, (1, 8, 8), schedule=SCHEDULE)
    states, times = trak.sampling_trajectories(pixel, model, 2, steps=3, seed=5, inference_steps=5)
    assert states.shape == (2, 3, 1, 8, 8) and times.tolist() == [80, 40, 0]  # DDIM's 5 steps: 80, 60, 40, 20, 0
    # the first kept state is the starting noise of item i, from (seed, i)
    start = torch.randn(
        (1, 8, 8),
        generator=torch.Generator().manual_seed(int(np.random.SeedSequence(5).generate_state(2, dtype=np.uint64)[1])),
    )
    torch.testing.assert_close(states[1, 0], start)
    got = space.trajectory_features(states, times)
    dense = dense_projection(space.projection)
    for i in range(2):
        f = (model(states[i], times).sample - space.noise).pow(2).mean()
        torch.testing.assert_close(got[i], flat_grad(f, model) @ dense, rtol=1e-4, atol=1e-6)


def test_scores_follow_their_papers_formulas_on_known_features() -> None:
    generator = torch.Generator().manual_seed(0)
    train, targets = torch.randn((7, 3), generator=generator), torch.randn((2, 3), generator=generator)
    F, T = train.double().numpy(), targets.double().numpy()
    K = F.T @ F
    inverse = np.linalg.inv(K + 0.1 * np.trace(K) / 3 * np.eye(3))
    tau = (T @ inverse @ F.T).mean(0)
    np.testing.assert_allclose(trak.item_scores(train, targets, lam=0.1), tau)
    np.testing.assert_allclose(
        trak.item_scores(train, targets, lam=0.1, normalise="relative"), tau / np.linalg.norm(F @ inverse, axis=1)
    )
    np.testing.assert_allclose(
        trak.item_scores(train, targets, lam=0.1, normalise="renormalized"), tau / np.linalg.norm(F, axis=1)
    )
    cosine = (T / np.linalg.norm(T, axis=1, keepdims=True)) @ (F / np.linalg.norm(F, axis=1, keepdims=True)).T
    np.testing.assert_allclose(trak.item_scores(train, targets, normalise="cosine"), cosine.mean(0))
    with pytest.raises(ValueError, match="lam=0: the relative ridge must be > 0"):
        trak.item_scores(train, targets, lam=0)


@pytest.mark.parametrize("method", [m for m, spec in trak.METHODS.items() if not spec.journey])
def test_trak_family_ranks_the_copies_of_the_targets_first(planted, new_model, method: str) -> None:
    data, targets = planted
    scores = trak.contributor_scores(
        method, new_model(), data, targets, projection_dim=64, timesteps=4, seed=0, lam=1e-3, schedule=SCHEDULE
    )
    assert list(scores.index) == ["copy", "noise", "other"]
    assert scores.idxmax() == "copy"
    if method in ("trak", "dtrak"):
        # τ are the ridge coefficients writing the mean target feature through the items' features: the target is
        # the mean of the copies' features, so the copies share a total of ~1 and the rest get ~0.
        assert scores["copy"] == pytest.approx(1.0, abs=0.02)
        assert abs(scores["noise"]) < 0.02 and abs(scores["other"]) < 0.02


def test_trak_is_seeded_and_aggregates_by_sum_mean_or_max(planted, new_model) -> None:
    data, targets = planted
    options = {"projection_dim": 8, "timesteps": 2, "lam": 1e-2, "schedule": SCHEDULE}
    first = trak.contributor_scores("dtrak", new_model(), data, targets, seed=3, **options)
    pd.testing.assert_series_equal(
        first, trak.contributor_scores("dtrak", new_model(), data, targets, seed=3, **options)
    )
    assert not np.allclose(first, trak.contributor_scores("dtrak", new_model(), data, targets, seed=4, **options))
    items = np.arange(18.0)
    assert contributor_totals(items, data, "mean").tolist() == [2.5, 8.5, 14.5]
    assert contributor_totals(items, data, "max").tolist() == [5.0, 11.0, 17.0]
    with pytest.raises(ValueError, match="unknown aggregate 'median'"):
        contributor_totals(items, data, "median")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lam": 0.0}, "lam=0.0: the relative ridge must be > 0"),
        ({"timesteps": 101}, "timesteps=101 exceeds the schedule's 100 training timesteps"),
        ({"targets": np.zeros((2, 1, 4, 4), np.float32)}, r"targets of shape \(2, 1, 4, 4\) do not match"),
        ({"method": "tracin"}, "unknown TRAK-family method 'tracin'"),
    ],
)
def test_trak_refuses_bad_settings(planted, options: dict, message: str, new_model) -> None:
    data, targets = planted
    kwargs = {
        "method": "trak",
        "targets": targets,
        "projection_dim": 4,
        "timesteps": 2,
        "seed": 0,
        "lam": 1e-2,
        "schedule": SCHEDULE,
    } | options
    with pytest.raises(ValueError, match=message):
        trak.contributor_scores(model=new_model(), data=data, **kwargs)


def test_trak_features_and_values_files_round_trip(tmp_path, planted, new_model) -> None:
    from diffcredit.models import save_model

    data, targets = planted
    save_model(new_model(), tmp_path / "model")
    data.save(tmp_path / "train.npz")
    ContributorData(targets, ["h"] * 6, [f"h{i}" for i in range(6)]).save(tmp_path / "heldout.npz")
    trak.write_features(
        output="loss",
        model=str(tmp_path / "model"),
        train_data=str(tmp_path / "train.npz"),
        out=str(tmp_path / "f.npz"),
        target="heldout",
        heldout_data=str(tmp_path / "heldout.npz"),
        n_trajectories=3,
        inference_steps=4,
        schedule=SCHEDULE,
        seed=0,
        projection_dim=32,
        timesteps=4,
        log=lambda m: None,
    )
    with np.load(tmp_path / "f.npz") as stored:
        assert stored["train"].shape == (18, 32) and stored["targets"].shape == (6, 32)
        assert stored["journey"].shape == (3, 32)
    for method in trak.METHODS:
        trak.write_values(
            method=method,
            features=str(tmp_path / "f.npz"),
            train_data=str(tmp_path / "train.npz"),
            out=str(tmp_path / f"{method}.csv"),
            lam=1e-3,
            log=lambda m: None,
        )
        table = pd.read_csv(tmp_path / f"{method}.csv")
        assert list(table["contributor"]) == ["copy", "noise", "other"] and table["seconds"].gt(0).all()
    assert pd.read_csv(tmp_path / "trak.csv").set_index("contributor")["rank"]["copy"] == 1


# --- In-Run Data Shapley ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_inrun_batch_gradients_equal_per_example_autograd_under_the_steps_masks(all_digits, tiny_config, dropout):
    model = build_model({**tiny_config, "dropout": dropout}, seed=0).double().train()
    scheduler = make_scheduler("ddpm", SCHEDULE)
    generator = torch.Generator().manual_seed(0)
    clean = torch.from_numpy(all_digits[:4]).double()
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    steps = torch.randint(0, 100, (4,), generator=generator)
    params = detached_params(model)
    direction = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in params.items()}
    state = torch.get_rng_state()
    batch = inrun.BatchGradients(model, clean, steps, noise, scheduler)
    dots = batch.dots(direction)
    torch.set_rng_state(state)  # the masks of the batch's forward pass, item by item through the same ops
    prediction = model(scheduler.add_noise(clean, noise, steps), steps).sample
    losses = (prediction - noise).pow(2).flatten(1).mean(1)
    flat_direction = torch.cat([direction[name].flatten() for name in params])
    weights = list(model.parameters())
    per_item = [
        torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], weights, retain_graph=True)]) for i in range(4)
    ]
    for i in range(4):
        assert dots[i].item() == pytest.approx((per_item[i] @ flat_direction).item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([g.flatten() for g in batch.total.values()]), sum(per_item))


def test_inrun_second_order_values_are_the_shapley_values_of_the_second_order_game(all_digits, new_model) -> None:
    """One step of 4 items: φ = the exact Shapley values of U(S) = η∇L·g_S − (η²/2) g_SᵀHg_S (enumerated, with
    gradients and Hessian-vector products by double backward), and group values = group Shapley values."""
    model = new_model().double().train()
    observer = inrun.InRunShapley(4, all_digits[40:46], seed=0, schedule=SCHEDULE)
    observer.val, observer.val_noise = observer.val.double(), observer.val_noise.double()
    generator = torch.Generator().manual_seed(1)
    clean = torch.from_numpy(all_digits[:4]).double()
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    steps = torch.randint(0, 100, (4,), generator=generator)
    lr = 0.8
    observer(model, torch.arange(4), clean, steps, noise)(lr)
    eta = lr / 4

    scheduler = observer.scheduler
    weights = list(model.parameters())
    gradients = []
    for i in range(4):
        noisy = scheduler.add_noise(clean[i : i + 1], noise[i : i + 1], steps[i : i + 1])
        loss = (model(noisy, steps[i : i + 1]).sample - noise[i : i + 1]).pow(2).mean()
        gradients.append(torch.autograd.grad(loss, weights))
    with sdpa_kernel(SDPBackend.MATH):  # double backward needs the math attention kernel
        val_loss = observer.validation_loss(model, {n: p for n, p in model.named_parameters()})
        val_grad = torch.autograd.grad(val_loss, weights, create_graph=True)

    def utility(members) -> float:
        if not members:
            return 0.0
        g = [sum(gradients[i][k] for i in members) for k in range(len(weights))]
        with sdpa_kernel(SDPBackend.MATH):
            hvp = torch.autograd.grad(val_grad, weights, grad_outputs=g, retain_graph=True)
        linear = sum((a * b).sum() for a, b in zip(val_grad, g, strict=True))
        quadratic = sum((a * b).sum() for a, b in zip(hvp, g, strict=True))
        return float(eta * linear.detach() - eta**2 / 2 * quadratic.detach())

    players = ["0", "1", "2", "3"]
    expected = reference_shapley(lambda members: utility([int(m) for m in members]), players)
    np.testing.assert_allclose(observer.first + observer.second, expected, rtol=1e-6, atol=1e-12)
    assert np.abs(observer.second).max() > 1e-3 * np.abs(observer.first).max()  # the second order matters here
    groups = {"a": [0, 2], "b": [1, 3]}
    group_values = reference_shapley(lambda gs: utility([i for g in gs for i in groups[g]]), ["a", "b"])
    np.testing.assert_allclose(group_values, [expected[[0, 2]].sum(), expected[[1, 3]].sum()], rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_inrun_values_sum_to_the_measured_validation_loss_change_under_sgd(all_digits, tiny_config, dropout) -> None:
    """Σφ over a short SGD run equals L_val(w_0) − L_val(w_T) (eval mode) up to third-order terms, with dropout too:
    the observer replays each step's dropout masks, and the run is the same with and without it."""
    config = {**tiny_config, "dropout": dropout}
    validation = all_digits[200:216]
    options = {
        "steps": 4,
        "batch_size": 8,
        "lr": 0.003,
        "optimizer": "sgd",
        "grad_clip": None,
        "schedule": SCHEDULE,
        "seed": 3,
        "log_every": 0,
    }
    model = build_model(config, seed=0)
    observer = inrun.InRunShapley(32, validation, seed=1, schedule=SCHEDULE)
    before = float(observer.validation_loss(model))
    images = all_digits[:32]
    torch.manual_seed(0)  # the dropout masks' stream
    train(model, images, observer=observer, **options)
    measured = before - float(observer.validation_loss(model))
    assert observer.steps == 4
    assert (observer.first + observer.second).sum() == pytest.approx(measured, rel=2e-3)
    first_order_error = abs(observer.first.sum() - measured)
    assert abs((observer.first + observer.second).sum() - measured) < 0.2 * first_order_error

    plain = build_model(config, seed=0)
    torch.manual_seed(0)
    train(plain, images, **options)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_inrun_credits_copies_of_the_validation_images_over_noise(all_digits, denoiser) -> None:
    validation = all_digits[200:212]
    noise = np.random.default_rng(1).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    data = ContributorData(
        np.concatenate([noise, validation]), ["noise"] * 12 + ["copy"] * 12, [f"i{i:02d}" for i in range(24)]
    )
    observer = inrun.item_scores(
        copy.deepcopy(denoiser),
        data.images,
        validation,
        steps=12,
        batch_size=8,
        lr=0.02,
        optimizer="sgd",
        grad_clip=None,
        seed=0,
        schedule=SCHEDULE,
        log_every=0,
    )
    table = observer.table(data)
    assert list(table.index) == ["noise", "copy"]
    assert table.loc["copy", "first_order"] > 2 * abs(table.loc["noise", "first_order"])
    # at this step size the curvature term takes value from both (steps overshoot), the copies stay ahead
    assert (table["second_order"] < 0).all() and table["value"].idxmax() == "copy"
    np.testing.assert_allclose(table["value"], table["first_order"] + table["second_order"])


def test_inrun_credits_only_the_items_of_the_batches(all_digits, new_model) -> None:
    observer = inrun.item_scores(
        new_model(),
        all_digits[:6],
        all_digits[50:54],
        steps=1,
        batch_size=2,
        lr=0.1,
        optimizer="sgd",
        seed=5,
        schedule=SCHEDULE,
        log_every=0,
    )
    assert np.count_nonzero(observer.first) == 2 and np.count_nonzero(observer.second) == 2


def test_inrun_validation_batch_at_least_the_set_is_all_of_it(all_digits, new_model) -> None:
    run = {"steps": 1, "batch_size": 2, "lr": 0.1, "optimizer": "sgd", "seed": 5, "schedule": SCHEDULE, "log_every": 0}
    everything = inrun.item_scores(new_model(), all_digits[:4], all_digits[50:53], validation_batch_size=None, **run)
    oversized = inrun.item_scores(new_model(), all_digits[:4], all_digits[50:53], validation_batch_size=128, **run)
    assert oversized.validation_batch_size is None
    np.testing.assert_array_equal(oversized.first, everything.first)
    np.testing.assert_array_equal(oversized.second, everything.second)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"order": 3}, "order=3: In-Run Data Shapley is implemented to order 1 or 2"),
        ({"validation_batch_size": 0}, r"validation_batch_size=0: choose at least 1, or None \(all\)"),
    ],
)
def test_inrun_refuses_bad_settings(all_digits, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        inrun.InRunShapley(4, all_digits[4:6], seed=0, schedule=SCHEDULE, **options)


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
    table = ablation_table(
        members, codes, MeanPixel(), generate=lambda model: generate(model, 3, **options), log=lambda message: None
    )
    assert list(table.index) == ["a", "b", "c"] and (table["members_left"] == 2).all()

    def utility(chosen: list[int]) -> float:
        return -float(np.mean(generate(AveragedEnsemble([members[m] for m in chosen]), 3, **options)))

    full = utility([0, 1, 2, 3])
    for contributor in codes.index:
        unseen = [m for m in range(4) if not codes.loc[contributor, m]]
        assert members_without(codes, contributor) == unseen
        assert table.loc[contributor, "utility_ablated"] == pytest.approx(utility(unseen), abs=1e-7)
        assert table.loc[contributor, "value"] == pytest.approx(full - utility(unseen), abs=1e-7)
        seen = [m for m in range(4) if codes.loc[contributor, m]]
        assert ensembles.members_with(codes, contributor) == seen and len(seen) == len(unseen)
        assert table.loc[contributor, "contrast"] == pytest.approx(utility(seen) - utility(unseen), abs=1e-7)
    with pytest.raises(ValueError, match="3 members given but the codes have 4 columns"):
        ablation_table(members[:3], codes, MeanPixel(), generate=lambda model: generate(model, 3, **options))


def test_codes_round_trip_through_the_workflow_file(tmp_path) -> None:
    pd.DataFrame({"contributor": ["x", "y", "z"], "n_items": [1, 2, 3]}).to_csv(
        tmp_path / "c.tsv", sep="\t", index=False
    )
    ensembles.write_codes(contributors=str(tmp_path / "c.tsv"), n_members=4, seed=2, out=str(tmp_path / "codes.tsv"))
    pd.testing.assert_frame_equal(ensembles.read_codes(tmp_path / "codes.tsv"), encode(["x", "y", "z"], 4, seed=2))


def test_each_contributor_trains_half_of_the_members() -> None:
    codes = encode(["x", "y", "z"], 4, seed=2)
    trained_on = [ensembles.member_contributors(codes, m) for m in range(4)]
    assert all(trained_on)
    assert {c: sum(c in seen for seen in trained_on) for c in "xyz"} == {"x": 2, "y": 2, "z": 2}


# --- similarity, heuristics, add-one-in -----------------------------------------------------------------------------


def test_pixel_similarity_ranks_the_copies_first_with_max_one(planted) -> None:
    from diffcredit.attribution import similarity

    data, targets = planted
    table = similarity.contributor_scores(similarity.cosine(data.images, targets), data)
    assert list(table.index) == ["copy", "noise", "other"]
    assert table.loc["copy", "max"] == pytest.approx(1.0)  # every target has its copy
    assert table["mean"].idxmax() == "copy" and table["max"].idxmax() == "copy"


def test_similarity_is_per_target_then_averaged() -> None:
    from diffcredit.attribution import similarity

    data = ContributorData(np.zeros((3, 1, 1, 2), np.float32), ["a", "a", "b"], ["x", "y", "z"])
    sims = np.array([[1.0, 0.0], [0.0, 0.5], [0.2, 0.2]])  # items x targets
    table = similarity.contributor_scores(sims, data)
    assert table.loc["a"].tolist() == pytest.approx([(0.5 + 0.25) / 2, (1.0 + 0.5) / 2])  # mean, max
    assert table.loc["b"].tolist() == pytest.approx([0.2, 0.2])
    np.testing.assert_allclose(
        similarity.cosine(np.array([[3.0, 4.0]]), np.array([[4.0, 3.0], [0.0, 2.0]])), [[24 / 25, 0.8]]
    )


def test_heuristics_on_known_embeddings() -> None:
    from diffcredit.attribution import heuristics

    data = ContributorData(np.zeros((4, 1, 1, 1), np.float32), ["a", "a", "b", "c"], list("wxyz"))
    embeddings = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 4.0], [1.0, -4.0]])  # mean (1, 0)
    distances = heuristics.embedding_distance(embeddings, data)
    assert distances.to_dict() == pytest.approx({"a": 0.0, "b": 4.0, "c": 4.0})
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.5]]))
        head.bias.zero_()
    scores = heuristics.aesthetic_scores(embeddings, head)
    np.testing.assert_allclose(scores, [0.0, 2.0, 3.0, -1.0])
    assert contributor_totals(scores, data, "max").tolist() == [2.0, 3.0, -1.0]


def test_add_one_in_values_and_intervals_over_repeats() -> None:
    from diffcredit.attribution import addition

    plan = addition.singleton_plan(["a", "b"])
    assert plan.to_dict("list") == {"coalition": ["empty", "a", "b"], "members": ["", "a", "b"]}
    utilities = pd.DataFrame(
        {
            "coalition": ["empty", "a", "b"] * 3,
            "repeat": np.repeat([0, 1, 2], 3),
            "utility": [1.0, 2.0, 1.0, 1.5, 3.0, 1.0, 0.5, 2.5, 1.0],
        }
    )
    table = addition.values_from(utilities, ["a", "b"], confidence=0.95)
    gains_a = np.array([1.0, 1.5, 2.0])  # v({a}, r) - v(∅, r)
    assert table.loc["a", "value"] == pytest.approx(1.5)
    assert table.loc["a", "stderr"] == pytest.approx(gains_a.std(ddof=1) / np.sqrt(3))
    assert table.loc["a", "ci_high"] - table.loc["a", "value"] == pytest.approx(1.959964 * table.loc["a", "stderr"])
    assert table.loc["b"].tolist()[:2] == pytest.approx([0.0, 0.5 / np.sqrt(3)])  # gains 0, -0.5, 0.5
    assert table["repeats"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="contributor id 'empty' is reserved"):
        addition.singleton_plan(["empty"])
    with pytest.raises(ValueError, match=r"no utilities for \['c'\]"):
        addition.values_from(utilities, ["a", "c"])


# --- utility.ema: continue (issue 13; belongs with the training tests) -----------------------------------------------


@pytest.mark.parametrize("ema_step", [0, 10_000])
def test_a_continued_ema_follows_diffusers_decay_from_the_given_step(digit_images, new_model, ema_step) -> None:
    """shadow ← d·shadow + (1−d)·w after each step, d = min(decay, n/(n+9)) at step n = ema_step + 1, ...: a fresh
    EMA (n = 1, d = 0) forgets the start weights at once, a continued one keeps ~all of them over a few steps."""
    options = {
        "steps": 3,
        "batch_size": 8,
        "lr": 0.05,
        "optimizer": "sgd",
        "seed": 0,
        "schedule": SCHEDULE,
        "log_every": 0,
    }
    trajectory = []
    raw = new_model()
    start = [p.detach().clone() for p in raw.parameters()]
    train(
        raw,
        digit_images,
        observer=lambda model, *_: (
            trajectory.append([p.detach().clone() for p in model.parameters()]) or (lambda lr: None)
        ),
        **options,
    )
    trajectory = [*trajectory[1:], [p.detach() for p in raw.parameters()]]  # weights after steps 1, 2, 3
    averaged = new_model()
    train(averaged, digit_images, ema_decay=0.9999, ema_step=ema_step, **options)
    shadow = start
    for n, weights in enumerate(trajectory, ema_step + 1):
        decay = 0.0 if n == 1 else min(0.9999, n / (n + 9))
        shadow = [decay * s + (1 - decay) * w for s, w in zip(shadow, weights, strict=True)]
    for got, expected in zip(averaged.parameters(), shadow, strict=True):
        torch.testing.assert_close(got, expected)
    kept_start = all(torch.allclose(g, s, atol=1e-3) for g, s in zip(averaged.parameters(), start, strict=True))
    assert kept_start == (ema_step > 0)


def test_train_full_accumulates_inrun_during_its_own_run(tmp_path, all_digits, tiny_config) -> None:
    """The workflow's train_full with `inrun` writes both values files; its model equals the one trained without, and
    the replay of the run (the `replay` route) reproduces the model and the values exactly."""
    from diffcredit import stages
    from diffcredit.models import load_model

    data = ContributorData(all_digits[:24], ["a", "b", "c"] * 8, [f"i{i:02d}" for i in range(24)])
    data.save(tmp_path / "train.npz")
    ContributorData(all_digits[100:108], ["h"] * 8, [f"h{i}" for i in range(8)]).save(tmp_path / "heldout.npz")
    recipe = {
        "unet": tiny_config,
        "schedule": SCHEDULE,
        "seed": 0,
        "steps": 3,
        "batch_size": 8,
        "lr": 1e-3,
        "optimizer": "sgd",
    }
    inrun_options = {"order": 2, "validation_batch_size": None}
    stages.train_full(
        train_data=str(tmp_path / "train.npz"),
        out=str(tmp_path / "full"),
        stats_out=str(tmp_path / "full.json"),
        inrun={
            "heldout_data": str(tmp_path / "heldout.npz"),
            "out": str(tmp_path / "inrun.csv"),
            "first_order_out": str(tmp_path / "first.csv"),
            **inrun_options,
        },
        **recipe,
    )
    stages.train_full(
        train_data=str(tmp_path / "train.npz"),
        out=str(tmp_path / "plain"),
        stats_out=str(tmp_path / "plain.json"),
        **recipe,
    )
    full, plain = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "plain").state_dict()
    assert all(torch.equal(full[name], plain[name]) for name in full)
    values = pd.read_csv(tmp_path / "inrun.csv").set_index("contributor")
    assert list(values.index) == ["a", "b", "c"] and (values["steps"] == 3).all()
    np.testing.assert_allclose(values["value"], values["first_order"] + values["second_order"])
    first = pd.read_csv(tmp_path / "first.csv").set_index("contributor")
    np.testing.assert_allclose(first["value"], values["first_order"])

    replayed = inrun.replay_values(
        train_data=str(tmp_path / "train.npz"),
        heldout_data=str(tmp_path / "heldout.npz"),
        full_model=str(tmp_path / "full"),
        out=str(tmp_path / "replay.csv"),
        log=lambda m: None,
        **inrun_options,
        **recipe,
    )
    np.testing.assert_allclose(replayed["value"], values["value"], rtol=1e-12)
