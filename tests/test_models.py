from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from diffcredit.models import (
    build_model,
    count_parameters,
    digits_unet_config,
    load_model,
    make_scheduler,
    save_model,
)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_config_is_json_and_builds_the_documented_unet():
    config = digits_unet_config()
    assert json.loads(json.dumps(config)) == config
    model = build_model(config, seed=0)
    assert isinstance(model, UNet2DModel)
    assert list(model.config.block_out_channels) == [32, 64, 64]
    assert [type(b).__name__ for b in model.down_blocks] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    # Every GroupNorm has >= 4 channels per group, so pruning half of them keeps >= 2 (see test_pruning).
    groups = [m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert min(groups) == 4
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])).sample.shape == (2, 1, 8, 8)


def test_build_model_is_seeded_and_leaves_global_rng_alone(tiny_config):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_model(tiny_config, seed=5), build_model(tiny_config, seed=5), build_model(tiny_config, seed=6)
    assert torch.equal(torch.rand(3), expected)
    assert same_weights(a, b) and not same_weights(a, c)


def test_build_model_refuses_unknown_class(tiny_config):
    with pytest.raises(ValueError, match="_class_name 'DDPMScheduler' is not a diffusers model class"):
        build_model({**tiny_config, "_class_name": "DDPMScheduler"})


def test_count_parameters_exact():
    assert count_parameters(nn.Sequential(nn.Linear(3, 2), nn.Conv2d(2, 4, 3))) == 3 * 2 + 2 + 2 * 4 * 9 + 4


def test_save_load_round_trip_is_exact(tmp_path, tiny_model):
    with torch.no_grad():
        for p in tiny_model.parameters():  # not the initial values, which a rebuild could reproduce by accident
            p.add_(torch.randn_like(p))
    save_model(tiny_model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["architecture.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging directory left
    loaded = load_model(tmp_path / "m")
    assert same_weights(tiny_model, loaded)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(tiny_model.eval()(x, t).sample, loaded(x, t).sample)
    save_model(loaded, tmp_path / "m")  # overwriting an existing model directory works
    assert same_weights(load_model(tmp_path / "m"), tiny_model)


def test_load_model_names_missing_files(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match=r"architecture\.json not found"):
        load_model(tmp_path / "m")


def test_make_scheduler_merges_defaults_and_refuses_unknown_sampler():
    scheduler = make_scheduler("ddim", {"num_train_timesteps": 20})
    assert scheduler.config.num_train_timesteps == 20 and scheduler.config.beta_schedule == "linear"
    with pytest.raises(ValueError, match="unknown sampler 'euler'; use one of ddpm, ddim"):
        make_scheduler("euler")
