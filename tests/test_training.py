from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcredit.contributors import ContributorData
from diffcredit.models import build_model
from diffcredit.training import select_device, train

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
    assert all(torch.equal(x, y) for x, y in zip(runs["a"][1], runs["b"][1]))
    assert not all(torch.equal(x, y) for x, y in zip(runs["a"][1], runs["c"][1]))


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
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_ema_zero_decay_equals_plain_training_and_positive_decay_lags(tiny_config, digit_images):
    trained = {}
    for decay in (None, 0.0, 0.99):
        model = build_model(tiny_config, seed=0)
        train(model, digit_images, steps=5, seed=0, ema_decay=decay, **FAST)
        trained[decay] = weights(model)
    assert all(torch.equal(x, y) for x, y in zip(trained[None], trained[0.0]))
    initial = weights(build_model(tiny_config, seed=0))
    # The average lags behind: it stays closer to the initial weights than the raw weights do.
    distance = {d: sum((w - w0).norm() ** 2 for w, w0 in zip(trained[d], initial)) for d in (None, 0.99)}
    assert distance[0.99] < distance[None]


def test_logging_reports_every_interval(tiny_model, digit_images):
    lines = []
    train(tiny_model, digit_images, steps=6, seed=0, log_every=3, log=lines.append, **FAST)
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]


def test_adamw_with_weight_decay_and_no_clipping_runs(tiny_model, digit_images):
    before = weights(tiny_model)
    train(tiny_model, digit_images, steps=2, seed=0, optimizer="adamw", weight_decay=0.1, grad_clip=None, **FAST)
    assert not all(torch.equal(x, y) for x, y in zip(before, weights(tiny_model)))


@pytest.mark.parametrize(
    ("images", "options", "message"),
    [
        (np.zeros((0, 1, 8, 8), np.float32), {}, "the empty coalition has no training run"),
        (np.zeros((4, 3, 8, 8), np.float32), {}, "images have 3 channels but the model takes 1"),
        (np.zeros((4, 1, 8, 8), np.float32), {"optimizer": "sgd"}, "unknown optimizer 'sgd'"),
        (np.zeros((4, 1, 8, 8), np.float32), {"steps": -1}, "need steps >= 0"),
    ],
)
def test_bad_input_is_refused(tiny_model, images, options, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_model, images, **{"steps": 1, "seed": 0, **FAST, **options})


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
            select_device("cuda")
