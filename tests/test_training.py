from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from diffcredit.contributors import ContributorData
from diffcredit.models import build_model, make_scheduler
from diffcredit.training import min_snr_weights, select_device, train

FAST = {"batch_size": 16, "lr": 1e-3, "device": "cpu"}


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_training_lowers_the_loss(tiny_model, digit_images):
    result = train(tiny_model, digit_images, steps=60, seed=0, **FAST)
    assert result.steps == 60 and len(result.losses) == 60 and result.device == "cpu"
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.7 * first, (first, last)


def test_same_seed_same_weights_other_seed_other_weights(tiny_config, digit_images):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        model = build_model(tiny_config, seed=0)
        runs[name] = (train(model, digit_images, steps=5, seed=seed, **FAST).losses, weights(model))
    assert runs["a"][0] == runs["b"][0]
    assert all(torch.equal(x, y) for x, y in zip(runs["a"][1], runs["b"][1], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(runs["a"][1], runs["c"][1], strict=True))


def test_coalition_fine_tune_sees_only_its_items(tiny_config, digit_images):
    """Poison the outsider's items: a leak would change (or NaN) the coalition's weights."""
    contributors = np.array(["inside"] * 32 + ["outside"] * 32)
    results = []
    for poison in (np.nan, 0.5):
        images = digit_images.copy()
        images[32:] = poison
        data = ContributorData(images, contributors, np.arange(64).astype(str))
        model = build_model(tiny_config, seed=0)
        train(model, data.subset(["inside"]).images, steps=4, seed=0, **FAST)
        results.append(weights(model))
    assert all(torch.isfinite(w).all() for w in results[0])
    assert all(torch.equal(x, y) for x, y in zip(*results, strict=True))


def test_ema_zero_decay_equals_plain_training_and_positive_decay_lags(tiny_config, digit_images):
    trained = {}
    for decay in (None, 0.0, 0.99):
        model = build_model(tiny_config, seed=0)
        train(model, digit_images, steps=5, seed=0, ema_decay=decay, **FAST)
        trained[decay] = weights(model)
    assert all(torch.equal(x, y) for x, y in zip(trained[None], trained[0.0], strict=True))
    initial = weights(build_model(tiny_config, seed=0))
    # The average lags behind: it stays closer to the initial weights than the raw weights do.
    distance = {d: sum((w - w0).norm() ** 2 for w, w0 in zip(trained[d], initial, strict=True)) for d in (None, 0.99)}
    assert distance[0.99] < distance[None]


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "diffcredit.training"]


def test_progress_is_logged_with_loss_rate_and_eta(tiny_config, digit_images, caplog):
    caplog.set_level(logging.INFO, logger="diffcredit.training")
    result = train(build_model(tiny_config, seed=0), digit_images, steps=6, seed=0, log_every=4, **FAST)
    lines = progress_lines(caplog)
    assert [line.split()[1] for line in lines] == ["4/6", "6/6"]
    # each report gives the mean loss of the steps since the previous one
    assert lines[1].endswith(f"loss {np.mean(result.losses[4:]):.4f}")
    assert "steps/s  ETA 00:00" in lines[1]
    caplog.clear()
    train(build_model(tiny_config, seed=0), digit_images, steps=25, seed=0, **FAST)  # default: about ten reports
    assert [line.split()[1] for line in progress_lines(caplog)] == [
        f"{s}/25" for s in (3, 6, 9, 12, 15, 18, 21, 24, 25)
    ]
    caplog.clear()
    train(build_model(tiny_config, seed=0), digit_images, steps=5, seed=0, log_every=0, **FAST)
    assert progress_lines(caplog) == []


def test_bf16_on_the_cpu_trains_in_fp32_and_peak_memory_is_cuda_only(tiny_config, digit_images, caplog):
    runs = {}
    for precision in ("fp32", "bf16"):
        model = build_model(tiny_config, seed=0)
        runs[precision] = (train(model, digit_images, steps=3, seed=0, precision=precision, **FAST), weights(model))
    assert "precision bf16 needs a CUDA device" in caplog.text
    assert runs["fp32"][0].losses == runs["bf16"][0].losses
    assert all(torch.equal(x, y) for x, y in zip(runs["fp32"][1], runs["bf16"][1], strict=True))
    assert runs["fp32"][0].peak_memory is None


def test_adamw_with_weight_decay_and_no_clipping_runs(tiny_model, digit_images):
    before = weights(tiny_model)
    train(tiny_model, digit_images, steps=2, seed=0, optimizer="adamw", weight_decay=0.1, grad_clip=None, **FAST)
    assert not all(torch.equal(x, y) for x, y in zip(before, weights(tiny_model), strict=True))


@pytest.mark.parametrize(
    ("images", "options", "message"),
    [
        (np.zeros((0, 1, 8, 8), np.float32), {}, "the empty coalition has no training run"),
        (np.zeros((4, 3, 8, 8), np.float32), {}, "images have 3 channels but the model takes 1"),
        (np.zeros((4, 1, 8, 8), np.float32), {"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        (np.zeros((4, 1, 8, 8), np.float32), {"steps": -1}, "need steps >= 0"),
        (np.zeros((4, 1, 8, 8), np.float32), {"precision": "fp16"}, "unknown precision 'fp16'; use one of fp32, bf16"),
        (np.zeros((4, 1, 8, 8), np.float32), {"snr_gamma": 0}, "snr_gamma must be positive"),
    ],
)
def test_bad_input_is_refused(tiny_model, images, options, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_model, images, **{"steps": 1, "seed": 0, **FAST, **options})


@pytest.mark.parametrize(
    ("prediction_type", "divisor"),
    [("epsilon", lambda snr: snr), ("v_prediction", lambda snr: snr + 1), ("sample", None)],
)
def test_min_snr_weights_are_min_snr_gamma_over_the_targets_factor(prediction_type, divisor):
    scheduler = make_scheduler("ddpm", {"prediction_type": prediction_type})
    timesteps = torch.tensor([0, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)  # from about 1e4 at t = 0 to about 4e-5 at t = 999
    expected = snr.clamp(max=2.0) / (divisor(snr) if divisor else 1)
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 2.0).double(), expected, rtol=1e-5, atol=0)
    if prediction_type == "epsilon":  # the noisy end keeps its full weight, the clean end is damped to γ/SNR
        weights = min_snr_weights(scheduler, timesteps, 2.0)
        assert weights[-1] == 1.0 and weights[0] < 1e-3


def test_min_snr_training_weights_the_loss_and_a_gamma_above_every_snr_does_not(tiny_config, digit_images):
    trained = {}
    for gamma in (None, 1e9, 1.0):
        model = build_model(tiny_config, seed=0)
        trained[gamma] = (train(model, digit_images, steps=3, seed=0, snr_gamma=gamma, **FAST).losses, weights(model))
    np.testing.assert_allclose(trained[1e9][0], trained[None][0], rtol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(trained[None][1], trained[1e9][1], strict=True))
    assert trained[1.0][0][0] < trained[None][0][0]  # the same first batch, its clean timesteps damped
    assert not all(torch.allclose(x, y, atol=1e-6) for x, y in zip(trained[None][1], trained[1.0][1], strict=True))


def test_min_snr_training_refuses_an_observer_that_replays_the_plain_loss(tiny_model, digit_images):
    def replaying(*_):
        return lambda step_size: None

    with pytest.raises(ValueError, match="replays the plain DDPM loss; train it without snr_gamma"):
        train(tiny_model, digit_images, steps=1, seed=0, snr_gamma=5.0, observer=replaying, **FAST)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
            select_device("cuda")


# --- an EMA run keeps its raw weights; a coalition's fine-tune starts from them, as the SFT-Shapley authors --------


def test_an_ema_run_saves_its_raw_weights_beside_the_average(tiny_config, digit_images, tmp_path):
    from diffcredit.models import load_model, load_raw_weights, save_model

    model = build_model(tiny_config, seed=0)
    result = train(model, digit_images, steps=5, seed=0, ema_decay=0.9, keep_raw=True, **FAST)
    raw = dict(result.raw_weights)
    assert not all(torch.equal(raw[name], p) for name, p in model.named_parameters())  # the average lags
    save_model(model, tmp_path / "run", result.raw_weights)
    loaded = load_model(tmp_path / "run")
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters(), strict=True))
    assert load_raw_weights(loaded, tmp_path / "run")
    assert all(torch.equal(p, raw[name]) for name, p in loaded.named_parameters())
    plain = build_model(tiny_config, seed=0)
    assert train(plain, digit_images, steps=2, seed=0, keep_raw=True, **FAST).raw_weights is None
    assert (
        train(build_model(tiny_config, seed=0), digit_images, steps=2, seed=0, ema_decay=0.9, **FAST).raw_weights
        is None
    )
    save_model(plain, tmp_path / "plain")
    before = weights(plain)
    assert not load_raw_weights(plain, tmp_path / "plain")
    assert all(torch.equal(x, y) for x, y in zip(before, weights(plain), strict=True))
    with pytest.raises(ValueError, match="not from this run"):
        load_raw_weights(build_model({**tiny_config, "layers_per_block": 2}, seed=0), tmp_path / "run")


@pytest.mark.parametrize("ema", ["fresh", "continue"])
def test_a_coalition_fine_tune_starts_from_the_raw_weights(tiny_config, digit_images, tmp_path, ema):
    """With zero fine-tuning steps the EMA's result is where it started: the raw weights (fresh, the authors' code) or
    the start run's average (continue)."""
    from diffcredit.models import save_model
    from diffcredit.utility import UtilitySettings, coalition_model

    start = build_model(tiny_config, seed=0)
    result = train(start, digit_images, steps=5, seed=0, ema_decay=0.9, keep_raw=True, **FAST)
    save_model(start, tmp_path / "start", result.raw_weights)
    data = ContributorData(digit_images[:16], ["a"] * 16, np.arange(16).astype(str))
    settings = UtilitySettings(
        mode="sft",
        steps=0,
        batch_size=8,
        lr=1e-3,
        model_config=tiny_config,
        schedule={},
        property="fid",
        seed=0,
        ema_decay=0.9999,
        ema_step=0 if ema == "fresh" else 10_000,
    )
    model, _ = coalition_model(["a"], 0, data=data, settings=settings, start_model=tmp_path / "start", device="cpu")
    expected = dict(result.raw_weights) if ema == "fresh" else dict(start.named_parameters())
    assert all(torch.equal(p, expected[name].detach()) for name, p in model.named_parameters())
