from __future__ import annotations

import pytest
import torch
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from diffcredit.models import build_model, count_parameters, digits_unet_config, load_model, save_model
from diffcredit.pruning import prune


def timestep_effect(model: nn.Module) -> float:
    """How much the output changes between an early and a late timestep on the same input."""
    x = torch.randn(4, model.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        early, late = (model.eval()(x, torch.full((4,), t)).sample for t in (10, 900))
    return (early - late).abs().max().item()


def test_magnitude_pruning_removes_the_expected_share_and_keeps_the_original(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    pruned = prune(tiny_model, 0.5)
    removed = 1 - count_parameters(pruned) / count_parameters(tiny_model)
    assert 0.65 < removed < 0.8  # channels halve on both sides of most weights: ~1 - 0.5**2
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    groups = [m.num_channels // m.num_groups for m in pruned.modules() if isinstance(m, nn.GroupNorm)]
    assert min(groups) == 2
    for module in pruned.modules():  # the fix-up diffusers needs: channel attributes follow the pruned convs
        if isinstance(module, (Upsample2D, Downsample2D)):
            assert module.channels == module.conv.in_channels
    with torch.no_grad():
        assert pruned(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])).sample.shape == (2, 1, 8, 8)


def test_smaller_ratio_prunes_less(tiny_model):
    assert count_parameters(prune(tiny_model, 0.5)) < count_parameters(prune(tiny_model, 0.25))


def test_pruned_model_still_depends_on_the_timestep(tiny_model):
    assert timestep_effect(prune(tiny_model, 0.5)) > 1e-3


def test_one_channel_per_group_ignores_the_timestep(tiny_config):
    """The GroupNorm trap that the check in prune() guards against, shown on an unpruned model."""
    trapped = build_model({**tiny_config, "norm_num_groups": 8, "block_out_channels": [8, 8]}, seed=0)
    assert timestep_effect(trapped) < 1e-4
    assert timestep_effect(build_model({**tiny_config, "block_out_channels": [8, 8]}, seed=0)) > 1e-3


def test_prune_refuses_to_leave_one_channel_per_group():
    # diffusers' default of 32 groups in the digits model: 32 channels -> 1 per group at ratio 0.5
    model = build_model({**digits_unet_config(), "norm_num_groups": 32})
    message = r"leave 0 channel\(s\) per group in GroupNorm 'down_blocks.0.resnets.0.norm1'"
    with pytest.raises(ValueError, match=message):
        prune(model, 0.5)


def test_pruned_model_round_trips_through_save_and_load(tmp_path, tiny_model):
    pruned = prune(tiny_model, 0.5)
    save_model(pruned, tmp_path / "p")
    loaded = load_model(tmp_path / "p")
    assert count_parameters(loaded) == count_parameters(pruned)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x, t).sample, loaded(x, t).sample)
    assert str(loaded) == str(pruned)  # module attributes (channels, features) were rebuilt too


@pytest.mark.parametrize("importance", ["taylor", "diff-pruning"])
def test_gradient_importances_choose_other_channels(tiny_model, digit_images, tiny_schedule, importance):
    magnitude = prune(tiny_model, 0.5)
    pruned = prune(tiny_model, 0.5, importance=importance, images=digit_images[:8], schedule=tiny_schedule)
    again = prune(tiny_model, 0.5, importance=importance, images=digit_images[:8], schedule=tiny_schedule)
    assert count_parameters(pruned) == count_parameters(magnitude)
    assert any(not torch.equal(a, b) for a, b in zip(pruned.parameters(), magnitude.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(pruned.parameters(), again.parameters(), strict=True))
    assert all(p.grad is None for p in pruned.parameters()) and all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.parametrize(
    ("ratio", "options", "message"),
    [
        (1.0, {}, r"pruning ratio must be in \(0, 1\), got 1.0"),
        (0.5, {"importance": "l1"}, "unknown importance 'l1'"),
        (0.5, {"importance": "taylor"}, "importance 'taylor' needs training images"),
    ],
)
def test_bad_arguments_are_refused(tiny_model, ratio, options, message):
    with pytest.raises(ValueError, match=message):
        prune(tiny_model, ratio, **options)
