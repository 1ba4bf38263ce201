"""The model families on tiny models built from configs: latent caching, text conditioning, LoRA save/load/prune."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcredit.contributors import ContributorData, contributor_ids, load_source, validate_contributor_id
from diffcredit.families import FAMILIES, Family, LatentFamily, TextLoraFamily, family_class, lora
from diffcredit.families import autoencoder as ae
from diffcredit.families import text_conditioning as tc
from diffcredit.glyphs import CONTRIBUTOR_FONTS, caption, captions_of, load_glyphs
from diffcredit.sampling import generate
from diffcredit.seeds import derive_seed

SAMPLING = {"inference_steps": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def glyphs():
    return load_glyphs(
        {k: CONTRIBUTOR_FONTS[k] for k in ("dejavu-sans", "dejavu-serif-bold")},
        letters="AOX",
        size=8,
        variants=2,
        seed=0,
    )


@pytest.fixture(scope="module")
def tiny_ae_config():
    return {
        **ae.tiny_autoencoder_config(channels=1, latent_channels=2),
        "block_out_channels": [8, 16],
        "norm_num_groups": 4,
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory, glyphs):
    """A pixel-space text-to-image base on 8×8 glyphs, saved and loaded back as a diffusers folder."""
    folder = tmp_path_factory.mktemp("base")
    pipeline = tc.tiny_base(glyphs[1], sample_size=8, seed=0)
    tc.save_base(pipeline, folder / "base")
    return tc.load_base(folder / "base")


def encode(pipeline, prompts):
    """The frozen text encoder's embeddings of ``prompts``, as PromptTable.build computes them."""
    return tc.encode_ids(pipeline, tc.tokenize(pipeline, prompts))


def _captions(data, texts):
    return dict(zip(data.item_ids, texts, strict=True))


def _randomise_lora(unet, seed=0):
    """A trained-looking adapter: fresh LoRAs have B = 0 and so change nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora.lora_parameters(unet):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


# --- glyphs -----------------------------------------------------------------------------------------------------


def test_glyphs_are_fonts_as_contributors_with_letter_captions(glyphs):
    data, captions = glyphs
    assert data.images.shape == (2 * 3 * 2, 1, 8, 8) and data.images.dtype == np.float32
    assert data.contributor_ids == ["dejavu-sans", "dejavu-serif-bold"]
    assert all(validate_contributor_id(c) == c for c in CONTRIBUTOR_FONTS)
    assert list(captions[:4]) == [caption("A"), caption("A"), caption("O"), caption("O")]
    assert "dejavu" not in " ".join(captions)  # prompts name the letter, never the font
    assert list(data.labels[:6]) == [0, 0, 1, 1, 2, 2]
    sans, serif = data.subset(["dejavu-sans"]).images, data.subset(["dejavu-serif-bold"]).images
    assert np.abs(sans - serif).mean() > 0.05  # the styles differ
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0 and data.images.max() > 0.5
    again, _ = load_glyphs({"dejavu-sans": CONTRIBUTOR_FONTS["dejavu-sans"]}, letters="AOX", size=8, seed=0)
    np.testing.assert_array_equal(again.images, sans)


def test_the_glyphs_source_renders_every_font_as_a_contributor_the_same_way_each_time(tmp_path):
    data = load_source("glyphs")
    assert data.contributor_ids == list(CONTRIBUTOR_FONTS) == contributor_ids("glyphs")  # ids without rendering
    assert data.images.shape == (12 * 26 * 2, 1, 16, 16) and list(data.counts()) == [52] * 12
    assert list(data.item_ids[:3]) == ["dejavu-sans-A0", "dejavu-sans-A1", "dejavu-sans-B0"]
    assert list(captions_of(data.item_ids[:3])) == [caption("A"), caption("A"), caption("B")]
    assert np.bincount(data.labels).tolist() == [24] * 26
    again = load_source("glyphs")  # a fresh rendering in the same process: the same pixels
    np.testing.assert_array_equal(again.images, data.images)
    manifest = tmp_path / "owners.tsv"
    manifest.write_text("item\tcontributor\n" + "".join(f"{i}\tpool\n" for i in data.item_ids))
    assert load_source("glyphs", manifest=manifest).contributor_ids == ["pool"]
    with pytest.raises(ValueError, match="rendered from matplotlib's fonts: leave path null"):
        load_source("glyphs", path="glyphs.npz")


# --- autoencoder ------------------------------------------------------------------------------------------------


def test_latents_are_cached_once_scaled_to_unit_std_and_decode_as_the_model_does(tmp_path, glyphs, tiny_ae_config):
    data = glyphs[0]
    model = ae.build_autoencoder(tiny_ae_config, seed=0)
    ae.save_autoencoder(model, tmp_path / "vq")
    model = ae.load_autoencoder(tmp_path / "vq")
    assert not any(p.requires_grad for p in model.parameters())
    factor = ae.cache_latents(model, data.images, data.item_ids, tmp_path / "latents.npz", autoencoder_digest="d1")
    raw = ae.encode(model, data.images)
    assert raw.shape == (len(data), 2, 4, 4)
    assert factor == pytest.approx(1 / raw.std(dtype=np.float64))
    order = data.item_ids[::-1]
    scaled, stored = ae.load_latents(tmp_path / "latents.npz", order, autoencoder_digest="d1")
    assert stored == pytest.approx(factor) and scaled.std() == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(scaled, raw[::-1] * factor, rtol=1e-6)
    # the round trip: decoding the cached latents is the autoencoder's own reconstruction
    with torch.no_grad():
        expected = model(torch.from_numpy(data.images)).sample.clamp(-1, 1).numpy()
    np.testing.assert_allclose(ae.decode(model, scaled[::-1] / factor), expected, atol=1e-5)
    with pytest.raises(ValueError, match="another autoencoder"):
        ae.load_latents(tmp_path / "latents.npz", order, autoencoder_digest="d2")
    with pytest.raises(ValueError, match="no latents for 1 item"):
        ae.load_latents(tmp_path / "latents.npz", np.array([*order, "unknown"]))


def test_training_the_autoencoder_lowers_its_reconstruction_error(glyphs, tiny_ae_config):
    data = glyphs[0]
    model = ae.build_autoencoder(tiny_ae_config, seed=0)
    losses = ae.train_autoencoder(model, data.images, steps=30, batch_size=12, lr=3e-3, seed=0, device="cpu")
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", ["VQModel", "AutoencoderKL"])
def test_each_autoencoder_training_step_encodes_its_batch_once(glyphs, tiny_ae_config, kind):
    # the reconstruction and the regulariser (commitment loss, KL) come from the same pass, not from one pass each
    config = dict(tiny_ae_config)
    if kind == "AutoencoderKL":
        config = {key: value for key, value in config.items() if key != "num_vq_embeddings"}
        config["_class_name"] = kind
    model = ae.build_autoencoder(config, seed=0)
    assert type(model).__name__ == kind
    passes = []
    model.encoder.register_forward_hook(lambda *_: passes.append(1))
    losses = ae.train_autoencoder(model, glyphs[0].images, steps=6, batch_size=12, lr=3e-3, seed=0, device="cpu")
    assert len(losses) == 6 and len(passes) == 6


def test_an_autoencoder_whose_latents_the_unet_does_not_fit_is_named(tiny_ae_config, tiny_config):
    fitting = {**tiny_config, "sample_size": 4, "in_channels": 2, "out_channels": 2}
    ae.check_fits(tiny_ae_config, (1, 8, 8), fitting)
    with pytest.raises(ValueError, match=r"in/out_channels 1/1 but the latents have 2 channels.*sample_size 8"):
        ae.check_fits(tiny_ae_config, (1, 8, 8), tiny_config)
    with pytest.raises(ValueError, match="do not divide by the autoencoder's downsampling factor 2"):
        ae.check_fits(tiny_ae_config, (1, 9, 9), fitting)
    with pytest.raises(ValueError, match="images have 3 channels but the autoencoder takes 1"):
        ae.check_fits(tiny_ae_config, (3, 8, 8), fitting)
    with pytest.raises(ValueError, match="is not an autoencoder"):
        ae.build_autoencoder({**tiny_ae_config, "_class_name": "UNet2DModel"}, seed=0)


def test_latent_family_refuses_a_unet_that_does_not_fit_before_training(tmp_path, glyphs, tiny_ae_config, tiny_config):
    data = glyphs[0]
    model = ae.build_autoencoder(tiny_ae_config, seed=0)
    ae.cache_latents(model, data.images, data.item_ids, tmp_path / "l.npz", autoencoder_digest="d")
    with pytest.raises(ValueError, match="does not fit the autoencoder's latents"):
        LatentFamily(tiny_config, autoencoder=model, latents=tmp_path / "l.npz", image_shape=(1, 8, 8))
    config = {**tiny_config, "sample_size": 4, "in_channels": 2, "out_channels": 2}
    family = LatentFamily(
        config, {"num_train_timesteps": 20}, autoencoder=model, latents=tmp_path / "l.npz", image_shape=(1, 8, 8)
    )
    unet = family.build(seed=0)
    family.fit(unet, data.subset(["dejavu-sans"]), steps=2, batch_size=4, lr=1e-3, seed=0, device="cpu")
    images = family.generate(unet, 3, seed=5, **SAMPLING)
    latents = generate(unet, 3, seed=5, schedule=family.schedule, clip=False, **SAMPLING)
    assert np.abs(latents).max() > 1  # latents leave the pixel range and are not clipped to it
    assert images.shape == (3, 1, 8, 8)  # decoded back to pixels
    np.testing.assert_allclose(images, ae.decode(model, latents / family.scaling_factor), atol=1e-6)


# --- pixel family ---------------------------------------------------------------------------------------------


def test_pixel_family_is_todays_models_training_and_sampling(tiny_config, tiny_schedule, digits):
    from diffcredit.models import build_model
    from diffcredit.training import train

    family = family_class("pixel")(tiny_config, tiny_schedule)
    assert {"pixel": Family, "latent": LatentFamily, "text_lora": TextLoraFamily} == FAMILIES
    data = ContributorData(digits.images[:16], digits.contributors[:16], digits.item_ids[:16])
    ours, theirs = family.build(seed=3), build_model(tiny_config, seed=3)
    family.fit(ours, data, steps=2, batch_size=8, lr=1e-3, seed=1, device="cpu")
    train(theirs, data.images, steps=2, batch_size=8, lr=1e-3, seed=1, schedule=tiny_schedule, device="cpu")
    np.testing.assert_array_equal(
        family.generate(ours, 2, seed=0, **SAMPLING), generate(theirs, 2, seed=0, schedule=tiny_schedule, **SAMPLING)
    )
    _, stats = family.prune(ours, 0.5)
    assert stats["parameters_after"] < stats["parameters_before"] == family.count_parameters(ours)
    with pytest.raises(ValueError, match="unknown model family 'sd'"):
        family_class("sd")


# --- text conditioning ------------------------------------------------------------------------------------------


def test_tokenizer_written_from_the_captions_encodes_them_without_unknown_tokens(tmp_path):
    from transformers import CLIPTokenizer

    tc.write_tokenizer(tmp_path / "tok", ["the letter A", "a Post-Impressionism painting"], max_length=12)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer.model_max_length == 12
    ids = tokenizer("The letter a").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["the</w>", "letter</w>", "a</w>"]  # whole words
    unseen = tokenizer("zebra 42!").input_ids[1:-1]
    assert len(unseen) > 2 and tokenizer.unk_token_id not in unseen[:-1]  # spelled out in byte symbols


def test_a_base_folder_missing_a_component_is_named(tmp_path, base):
    tc.save_base(base, tmp_path / "b")
    import shutil

    shutil.rmtree(tmp_path / "b" / "tokenizer")
    (tmp_path / "b" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"lacks tokenizer/tokenizer_config.json, scheduler/scheduler_config.json"
    ):
        tc.load_base(tmp_path / "b")


def test_captions_missing_for_some_items_are_named():
    assert tc.check_captions(["a", "b"], None, "a painting") == ["a painting", "a painting"]
    assert tc.check_captions(["a", "b"], {"a": "x", "b": "y"}, None) == ["x", "y"]
    with pytest.raises(ValueError, match=r"2 of 3 items have no caption, e.g. \['b', 'c'\]"):
        tc.check_captions(["a", "b", "c"], {"a": "x", "b": " "}, None)
    with pytest.raises(ValueError, match="not both or neither"):
        tc.check_captions(["a"], {"a": "x"}, "a painting")


def test_the_conditioned_unet_attends_to_each_items_caption(base, glyphs):
    _, captions = glyphs
    table = tc.PromptTable.build(base, captions)
    assert len(table.embeddings) == 3 and list(table.codes[:4]) == [0, 0, 1, 1]  # one row per distinct caption
    conditioned = tc.ConditionedUNet(base.unet, table)
    sample, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    conditioned.observe(conditioned, torch.tensor([0, 2]))
    with torch.no_grad():
        out = conditioned(sample, t).sample
        direct = base.unet(sample, t, encoder_hidden_states=encode(base, [captions[0], captions[2]])).sample
    torch.testing.assert_close(out, direct)
    with pytest.raises(RuntimeError, match=r"observer=model\.observe"):
        conditioned(torch.randn(3, 1, 8, 8), torch.tensor([5, 5, 5]))


def test_caption_dropout_shows_the_empty_prompt_to_a_seeded_share_of_the_items(base, glyphs):
    _, captions = glyphs
    table = tc.PromptTable.build(base, captions, extra=[""])
    empty = table.code_of("")
    assert table.distinct[empty] == "" and empty not in set(table.codes.tolist())  # encoded, owned by no item

    def observed(seed: int) -> torch.Tensor:
        conditioned = tc.ConditionedUNet(base.unet, table, caption_dropout=0.25, seed=seed)
        batches = []
        for _ in range(40):
            conditioned.observe(conditioned, torch.arange(len(captions)))
            batches.append(conditioned._batch)
        return torch.stack(batches)

    seen = observed(seed=0)
    kept = seen != empty
    assert torch.equal(seen[kept], table.codes.expand_as(seen)[kept])  # an item shown a caption is shown its own
    assert (~kept).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(observed(seed=0), seen) and not torch.equal(observed(seed=1), seen)
    with pytest.raises(ValueError, match=r"build it with extra=\[''\]"):
        tc.ConditionedUNet(base.unet, tc.PromptTable.build(base, captions), caption_dropout=0.1)
    with pytest.raises(ValueError, match=r"caption_dropout must lie in \[0, 1\)"):
        tc.ConditionedUNet(base.unet, table, caption_dropout=1.0)


# --- LoRA -------------------------------------------------------------------------------------------------------


@pytest.fixture
def text_family(base, glyphs):
    data, captions = glyphs
    return TextLoraFamily(base, _captions(data, captions), rank=4)


def test_a_conditioned_unet_with_a_text_encoder_encodes_the_captions_anew_and_passes_it_gradients(glyphs):
    _, captions = glyphs
    pipeline = tc.tiny_base(captions, sample_size=8, seed=0)
    table = tc.PromptTable.build(pipeline, captions)
    encoder = pipeline.text_encoder.requires_grad_(True)
    assert torch.equal(table.input_ids, tc.tokenize(pipeline, table.distinct))
    conditioned = tc.ConditionedUNet(pipeline.unet, table, text_encoder=encoder)
    sample, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    conditioned.observe(conditioned, torch.tensor([0, 2]))
    out = conditioned(sample, t).sample
    with torch.no_grad():
        direct = pipeline.unet(sample, t, encoder_hidden_states=table.embeddings[table.codes[[0, 2]]]).sample
    torch.testing.assert_close(out.detach(), direct)
    out.square().mean().backward()
    assert encoder.get_input_embeddings().weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="token ids of every caption of the table"):
        tc.ConditionedUNet(
            pipeline.unet, dataclasses.replace(table, input_ids=tc.tokenize(pipeline, ["x"])), text_encoder=encoder
        )
    with pytest.raises(ValueError, match="token ids of every caption of the table"):
        tc.ConditionedUNet(pipeline.unet, dataclasses.replace(table, input_ids=None), text_encoder=encoder)


def test_pretraining_trains_the_stand_ins_text_encoder_with_its_unet_unless_told_not_to(glyphs):
    data, captions = glyphs
    texts = sorted(set(captions))

    def pretrained(train_text_encoder: bool):
        pipeline = tc.tiny_base(captions, sample_size=8, seed=0)
        before = encode(pipeline, texts), [p.clone() for p in pipeline.unet.parameters()]
        tc.pretrain(
            pipeline,
            data.images,
            captions,
            steps=3,
            batch_size=4,
            lr=1e-2,
            seed=0,
            caption_dropout=0.25,
            train_text_encoder=train_text_encoder,
            log_every=0,
        )
        unet_moved = any(not torch.equal(a, b) for a, b in zip(before[1], pipeline.unet.parameters(), strict=True))
        return pipeline, before[0], unet_moved

    trained, initial, unet_moved = pretrained(True)
    assert unet_moved and not torch.allclose(encode(trained, texts), initial)
    assert not trained.text_encoder.training and not any(p.requires_grad for p in trained.text_encoder.parameters())
    frozen, initial_too, unet_moved = pretrained(False)
    assert unet_moved and torch.equal(initial_too, initial)  # the same initialisation
    assert torch.equal(encode(frozen, texts), initial)


def test_lora_save_then_load_gives_identical_images(tmp_path, text_family):
    unet = text_family.build(seed=0)
    _randomise_lora(unet)
    text_family.save(unet, tmp_path / "lora")
    assert (tmp_path / "lora" / lora.WEIGHTS).is_file()
    loaded = text_family.load(tmp_path / "lora")
    first = text_family.generate(unet, 3, seed=1, **SAMPLING)
    np.testing.assert_array_equal(text_family.generate(loaded, 3, seed=1, **SAMPLING), first)
    assert not np.array_equal(text_family.generate(text_family.null_model(0), 3, seed=1, **SAMPLING), first)


def test_the_null_model_is_the_base_and_disabling_the_lora_gives_it_back(text_family, base):
    null = text_family.null_model(seed=0)
    assert not lora.lora_layers(null)
    reference = text_family.generate(base.unet, 4, seed=2, **SAMPLING)
    np.testing.assert_array_equal(text_family.generate(null, 4, seed=2, **SAMPLING), reference)
    adapted = text_family.build(seed=0)
    fresh = text_family.generate(adapted, 4, seed=2, **SAMPLING)
    np.testing.assert_array_equal(fresh, reference)  # B starts at zero
    _randomise_lora(adapted)
    adapted.disable_adapters()
    np.testing.assert_array_equal(text_family.generate(adapted, 4, seed=2, **SAMPLING), reference)


def test_lora_importance_is_torch_prunings_magnitude_on_the_rank_group(text_family):
    unet = text_family.build(seed=0)
    _randomise_lora(unet)
    layer = next(iter(lora.lora_layers(unet).values()))
    a, b = layer.lora_A[lora.ADAPTER].weight, layer.lora_B[lora.ADAPTER].weight
    closed = 0.5 * (a.pow(2).sum(1) + b.pow(2).sum(0))
    torch.testing.assert_close(lora.importance(layer), (closed / closed.mean()).detach())


def test_a_pruned_lora_keeps_at_most_its_share_drops_the_weakest_and_reloads_with_its_ranks(tmp_path, text_family):
    unet = text_family.build(seed=0)
    _randomise_lora(unet)
    name, layer = next(iter(lora.lora_layers(unet).items()))
    with torch.no_grad():  # plant the weakest component of the first module
        layer.lora_A[lora.ADAPTER].weight[2] *= 1e-3
        layer.lora_B[lora.ADAPTER].weight[:, 2] *= 1e-3
    original = layer.lora_A[lora.ADAPTER].weight.detach().clone()
    pruned, stats = text_family.prune(unet, 0.5)
    assert stats["parameters_after"] <= 0.5 * stats["parameters_before"]
    assert text_family.count_parameters(unet) == stats["parameters_before"]  # the input is left unchanged
    ranks = lora.ranks(pruned)
    assert ranks == stats["ranks"] and min(ranks.values()) >= 1 and len(set(ranks.values())) > 1
    left = lora.lora_layers(pruned)[name].lora_A[lora.ADAPTER].weight.detach()
    matches = [int(torch.cdist(row[None], original).argmin()) for row in left]
    assert 2 not in matches and matches == sorted(set(matches))  # the planted one went; the rest kept their order
    torch.testing.assert_close(left, original[matches])
    text_family.save(pruned, tmp_path / "pruned")
    assert lora.read_ranks(tmp_path / "pruned") == ranks
    config = lora.saved_config(tmp_path / "pruned")
    assert {k: config["rank_pattern"].get(k, config["r"]) for k in ranks} == ranks
    assert config["alpha_pattern"] == {k: float(v) for k, v in config["rank_pattern"].items()}  # scale stays 1
    loaded = text_family.load(tmp_path / "pruned")
    assert lora.ranks(loaded) == ranks
    np.testing.assert_array_equal(
        text_family.generate(loaded, 2, seed=3, **SAMPLING), text_family.generate(pruned, 2, seed=3, **SAMPLING)
    )
    with pytest.raises(ValueError, match="pruned by magnitude"):
        text_family.prune(unet, 0.5, importance="taylor")


def test_a_lora_whose_ranks_do_not_match_its_config_is_named(tmp_path, text_family):
    unet = text_family.build(seed=0)
    pruned, _ = text_family.prune(unet, 0.5)
    text_family.save(pruned, tmp_path / "l")
    path = tmp_path / "l" / lora.WEIGHTS
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.rank_pattern"] = {}  # a stale config: every module claims the original rank
    save_file(load_file(path), path, metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(ValueError, match="rank disagrees with the recorded LoRA config"):
        text_family.load(tmp_path / "l")


def test_fitting_a_lora_trains_only_the_adapter(text_family, glyphs):
    data = glyphs[0]
    unet = text_family.build(seed=0)
    base_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora" not in k}
    lora_before = [p.detach().clone() for p in lora.lora_parameters(unet)]
    result = text_family.fit(unet, data.subset(["dejavu-sans"]), steps=3, batch_size=4, lr=1e-2, seed=0, device="cpu")
    assert result.steps == 3
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora.lora_parameters(unet), strict=True))
    family = TextLoraFamily(text_family.base, {data.item_ids[0]: "x"}, rank=2)
    with pytest.raises(ValueError, match="have no caption"):
        family.fit(copy.deepcopy(unet), data, steps=1, batch_size=2, lr=1e-3, seed=0, device="cpu")


# --- prepare once, open in every job ----------------------------------------------------------------------------


def test_each_family_is_prepared_once_and_opened_from_its_folder(tmp_path, glyphs, tiny_config):
    data = glyphs[0]
    pixel = Family.prepare(tmp_path / "pixel", data=data, seed=0)
    assert pixel == {"family": "pixel"}
    opened = family_class("pixel").open(tmp_path / "pixel", image_shape=data.images.shape, unet=tiny_config)
    assert opened.unet_config["block_out_channels"] == tiny_config["block_out_channels"]
    with pytest.raises(ValueError, match="prepared for the 'pixel' family, not 'latent'"):
        LatentFamily.open(tmp_path / "pixel", image_shape=data.images.shape)
    with pytest.raises(ValueError, match="takes no family options"):
        Family.prepare(tmp_path / "p2", data=data, seed=0, rank=4)

    summary = LatentFamily.prepare(
        tmp_path / "staging", data=data, seed=0, steps=3, batch_size=8, device="cpu", log=lambda _: None
    )
    assert summary["latent_shape"] == [3, 4, 4] and summary["scaling"] == "measured (1/std)"
    (tmp_path / "staging").rename(tmp_path / "latent")
    assert summary["autoencoder"] is None  # trained in the folder, not staged
    raw = ae.encode(ae.load_autoencoder(tmp_path / "latent" / "autoencoder"), data.images)
    assert summary["scaling_factor"] == pytest.approx(1 / raw.std(dtype=np.float64))
    latent = LatentFamily.open(tmp_path / "latent", image_shape=data.images.shape)  # after a move
    assert (latent.unet_config["sample_size"], latent.unet_config["in_channels"]) == (4, 3)
    assert latent.inputs(data).shape == (len(data), 3, 4, 4)


def test_the_text_family_prepares_captions_and_a_base(tmp_path, glyphs, base):
    data = glyphs[0]
    summary = TextLoraFamily.prepare(
        tmp_path / "staging",
        data=data,
        seed=0,
        captions="glyphs",
        steps=2,
        batch_size=8,
        device="cpu",
        log=lambda _: None,
    )
    assert summary["n_captions"] == 3 and summary["base_pretraining_items"] > len(data) and summary["base"] is None
    (tmp_path / "staging").rename(tmp_path / "standin")
    family = TextLoraFamily.open(tmp_path / "standin", rank=2)
    assert family.prompts == [caption("A"), caption("O"), caption("X")]
    assert family.captions[data.item_ids[0]] == caption("A")
    tc.save_base(base, tmp_path / "staged")
    TextLoraFamily.prepare(tmp_path / "shared", data=data, seed=0, base=str(tmp_path / "staged"), prompt="a glyph")
    shared = TextLoraFamily.open(tmp_path / "shared", rank=2)
    assert shared.prompts == ["a glyph"] and set(shared.captions.values()) == {"a glyph"}
    with pytest.raises(ValueError, match="comes from the base model"):
        TextLoraFamily.open(tmp_path / "shared", unet={"sample_size": 8})
    with pytest.raises(ValueError, match="is not a glyph's"):
        TextLoraFamily.prepare(
            tmp_path / "bad", data=ContributorData(data.images[:1], ["x"], ["item7"]), seed=0, captions="glyphs"
        )


def test_the_stand_in_base_pre_trains_with_the_configured_min_snr_weights(tmp_path, glyphs):
    from diffcredit.families import prepare_family

    weights = {}
    for gamma in (None, 1.0):
        model = {
            "family": "text_lora",
            "text_lora": {"captions": "glyphs", "steps": 2, "batch_size": 8, "snr_gamma": gamma},
        }
        prepare_family(model, tmp_path / str(gamma), data=glyphs[0], seed=0, device="cpu", log=lambda _: None)
        weights[gamma] = tc.load_base(tmp_path / str(gamma) / "base").unet.conv_in.weight
    assert not torch.allclose(weights[None], weights[1.0])


def test_glyphs_written_as_npz_load_as_a_source_with_their_ids(tmp_path):
    from diffcredit.contributors import load_source
    from diffcredit.glyphs import captions_of, main

    main([str(tmp_path / "g.npz"), "--size", "8", "--variants", "1"])
    data = load_source("npz", path=tmp_path / "g.npz")
    assert len(data) == len(CONTRIBUTOR_FONTS) * 26 and data.images.shape[1:] == (1, 8, 8)
    assert list(captions_of(data.item_ids[:2])) == [caption("A"), caption("B")]


def test_the_configs_model_section_chooses_the_family_and_its_options(tmp_path, glyphs, tiny_config):
    from diffcredit.families import open_family, prepare_family

    data = glyphs[0]
    model = {
        "family": "latent",
        "unet": {},
        "schedule": {"num_train_timesteps": 20},
        "latent": {"steps": 2, "batch_size": 8, "latent_channels": 2},
    }
    summary = prepare_family(model, tmp_path / "l", data=data, seed=0, device="cpu", log=lambda _: None)
    assert summary["latent_shape"] == [2, 4, 4]
    family = open_family(model, tmp_path / "l", image_shape=data.images.shape)
    assert isinstance(family, LatentFamily) and family.schedule == {"num_train_timesteps": 20}
    pixel = {"unet": tiny_config, "schedule": {}}  # no family key: today's pixel model
    prepare_family(pixel, tmp_path / "p", data=data, seed=0)
    assert type(open_family(pixel, tmp_path / "p", image_shape=data.images.shape)) is Family


def test_a_workflow_spec_opens_its_family_once_per_process(tmp_path, glyphs, tiny_config):
    from diffcredit.families import family_of, prepare_family

    data = glyphs[0]
    model = {"family": "pixel", "unet": tiny_config, "schedule": {}}
    prepare_family(model, tmp_path / "p", data=data, seed=0)
    spec = {"model": model, "directory": str(tmp_path / "p")}
    assert family_of(spec, (1, 8, 8)) is family_of(dict(spec), (1, 8, 8))
    default = family_of(None, (1, 8, 8), unet=tiny_config, schedule={"num_train_timesteps": 20})
    assert default.unet_config["block_out_channels"] == tiny_config["block_out_channels"]


def test_a_unet_that_does_not_fit_the_latents_is_refused_before_the_autoencoder_trains(tmp_path, glyphs):
    from diffcredit.families import prepare_family

    model = {"family": "latent", "unet": {"sample_size": 8}, "latent": {"steps": 10_000}}  # would train for minutes
    with pytest.raises(ValueError, match="sample_size 8 but the latents are 4x4"):
        prepare_family(model, tmp_path / "l", data=glyphs[0], seed=0, device="cpu")


# --- encoded ensembles in every family -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["latent", "text_lora"])
def test_encoded_ensemble_members_train_from_scratch_and_sample_through_the_family(
    name, tmp_path, glyphs, latent_spec, text_spec
):
    """A member is the family's model retrained from scratch on its half of the contributors (a fresh LoRA in the text
    family), saved and reloaded as the family saves; the ensemble of one member samples as that member through the
    family's own sampler (decoded latents; the UNet under each image's prompt), and two members' mean differs."""
    from diffcredit.attribution import ensembles
    from diffcredit.families import family_of

    data = glyphs[0]
    data.save(tmp_path / "train.npz")
    spec = {"latent": latent_spec, "text_lora": text_spec}[name]
    family = family_of(spec, data.images.shape[1:])
    codes = ensembles.encode(data.contributor_ids, 6, seed=0)
    codes.astype(int).to_csv(tmp_path / "codes.tsv", sep="\t")
    recipe = {"steps": 2, "batch_size": 4, "lr": 1e-2, "device": "cpu"}
    for member in (0, 1):
        ensembles.train_member(
            codes=str(tmp_path / "codes.tsv"),
            member=member,
            train_data=str(tmp_path / "train.npz"),
            out=str(tmp_path / f"m{member}"),
            seed=3,
            family=spec,
            **recipe,
        )
    expected = family.build(seed=derive_seed(3, "ensemble-init", 0))
    family.fit(
        expected,
        data.subset(ensembles.member_contributors(codes, 0)),
        seed=derive_seed(3, "ensemble-train", 0),
        **recipe,
    )
    members = [family.load(tmp_path / f"m{member}") for member in (0, 1)]
    sampling = {"seed": 5, "inference_steps": 2, "device": "cpu"}
    alone = family.generate(members[0], 4, **sampling)
    np.testing.assert_allclose(alone, family.generate(expected, 4, **sampling), atol=1e-5)
    np.testing.assert_array_equal(family.generate(ensembles.AveragedEnsemble(members[:1]), 4, **sampling), alone)
    pair = family.generate(ensembles.AveragedEnsemble(members), 4, **sampling)
    assert pair.shape == alone.shape and not np.allclose(pair, alone)


# --- the TRAK family and the similarity baselines in every family -------------------------------------------------


@pytest.fixture(scope="module")
def latent_spec(tmp_path_factory, glyphs):
    """A prepared latent family (a tiny autoencoder trained 2 steps) as the workflow names it."""
    from diffcredit.families import prepare_family

    folder = tmp_path_factory.mktemp("latent")
    model = {
        "family": "latent",
        "unet": {},
        "schedule": {"num_train_timesteps": 20},
        "latent": {"steps": 2, "batch_size": 8, "latent_channels": 2},
    }
    prepare_family(model, folder, data=glyphs[0], seed=0, device="cpu", log=lambda _: None)
    return {"model": model, "directory": str(folder)}


def _projected_gradient(space, loss, params):
    """φ by hand: torch.autograd's gradient of `loss` w.r.t. `params` (name -> tensor), through the space's P."""
    grads = torch.autograd.grad(loss, list(params.values()))
    return space.projection.project({name: g[None] for name, g in zip(params, grads, strict=True)})[0]


def test_latent_trak_features_are_gradients_on_the_latents_and_copies_of_the_targets_rank_first(glyphs, latent_spec):
    from diffcredit.attribution import trak
    from diffcredit.families import family_of
    from diffcredit.training import denoising_target

    data = glyphs[0]
    latent = family_of(latent_spec, data.images.shape[1:])
    model = latent.build(seed=0)
    first = data.contributors[0]
    copies = data.images[np.asarray(data.contributors) == first]  # the targets: one contributor's own images
    settings = {"projection_dim": 32, "timesteps": 3, "seed": 1, "batch_size": 4}
    features = trak.compute_features(model, data, copies, output="loss", family=latent, **settings)
    assert features["train"].shape == (len(data), 32) and features["targets"].shape == (len(copies), 32)
    # a target is encoded as the training latents were cached: a copy's feature is its item's
    torch.testing.assert_close(features["targets"], features["train"][: len(copies)], rtol=1e-3, atol=1e-5)
    space = trak.FeatureSpace.build(model, (2, 4, 4), schedule=latent.schedule, **settings)
    clean = torch.from_numpy(latent.inputs(data)[1]).expand(3, -1, -1, -1)
    noisy = space.scheduler.add_noise(clean, space.noise, space.timesteps)
    target = denoising_target(space.scheduler, clean, space.noise, space.timesteps)
    loss = (model(noisy, space.timesteps).sample - target).pow(2).mean()
    expected = _projected_gradient(space, loss, dict(model.named_parameters()))
    torch.testing.assert_close(features["train"][1], expected, rtol=1e-4, atol=1e-5)
    scores = trak.score_features("trak", features, data, lam=1e-3)
    assert scores.idxmax() == first and scores[first] == pytest.approx(1.0, abs=0.05)


def test_text_lora_trak_features_are_lora_gradients_under_each_items_caption(text_family, glyphs, base):
    from diffcredit.attribution import detached_params, trak
    from diffcredit.training import denoising_target

    data, captions = glyphs
    unet = text_family.build(seed=0)
    _randomise_lora(unet)
    settings = {"projection_dim": 16, "timesteps": 2, "seed": 0}
    features = trak.compute_features(unet, data, None, output="loss", family=text_family, batch_size=5, **settings)
    space = trak.FeatureSpace.build(unet, (1, 8, 8), schedule=text_family.schedule, **settings)
    params = {name: p for name, p in unet.named_parameters() if name in detached_params(unet)}
    assert params and all("lora" in name for name in params)  # the adapter only, as it is what a coalition trains
    for i in (0, 2, 5):  # items of the three captions
        clean = torch.from_numpy(data.images[i]).expand(2, -1, -1, -1)
        states = encode(base, [captions[i]]).expand(2, -1, -1)
        noisy = space.scheduler.add_noise(clean, space.noise, space.timesteps)
        prediction = unet(noisy, space.timesteps, encoder_hidden_states=states).sample
        loss = (prediction - denoising_target(space.scheduler, clean, space.noise, space.timesteps)).pow(2).mean()
        torch.testing.assert_close(features["train"][i], _projected_gradient(space, loss, params), rtol=1e-4, atol=1e-6)
    recaptioned = TextLoraFamily(base, _captions(data, [captions[-1]] * len(data)), rank=4)
    other = trak.compute_features(unet, data, None, output="loss", family=recaptioned, **settings)
    same = np.asarray(captions) == captions[-1]
    torch.testing.assert_close(other["train"][same], features["train"][same], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(other["train"][~same], features["train"][~same])  # the caption changes the gradient


def test_journey_trajectories_follow_the_familys_sampler_in_its_latents(glyphs, latent_spec):
    from diffcredit.attribution import trak
    from diffcredit.families import family_of

    latent = family_of(latent_spec, glyphs[0].images.shape[1:])
    model = latent.build(seed=0)
    states, times = trak.sampling_trajectories(latent, model, 3, steps=2, seed=4, inference_steps=4, device="cpu")
    assert states.shape == (3, 2, 2, 4, 4) and times.tolist() == [15, 0]  # DDIM's 4 of 20 steps: 15, 10, 5, 0
    kept = []
    sampling = {"seed": 4, "inference_steps": 4, "sampler": "ddim", "device": "cpu"}
    latent.generate(model, 3, **sampling, on_step=lambda i, t, x: kept.append(x.clone()))
    torch.testing.assert_close(states[:, 0], kept[0])  # the starting noise
    torch.testing.assert_close(states[:, 1], kept[3])  # the state before the last step
    with pytest.raises(ValueError, match="inference_steps=1 gives fewer sampling steps than the 2 feature timesteps"):
        trak.sampling_trajectories(latent, model, 3, steps=2, seed=4, inference_steps=1)


def test_trak_and_similarity_stages_run_in_a_latent_and_a_text_lora_family(tmp_path, glyphs, base, latent_spec):
    from diffcredit.attribution import similarity, trak
    from diffcredit.families import family_of, prepare_family

    data = glyphs[0]
    data.save(tmp_path / "train.npz")
    data.save(tmp_path / "heldout.npz")
    tc.save_base(base, tmp_path / "staged")
    text_model = {"family": "text_lora", "text_lora": {"base": str(tmp_path / "staged"), "prompt": "a glyph"}}
    prepare_family(text_model, tmp_path / "text", data=data, seed=0, log=lambda _: None)
    specs = {"latent": latent_spec, "text_lora": {"model": text_model, "directory": str(tmp_path / "text")}}
    sampling = {"seed": 0, "inference_steps": 3, "sampler": "ddim"}
    for name, spec in specs.items():
        family = family_of(spec, data.images.shape[1:])
        family.save(family.build(seed=0), tmp_path / name / "model")
        options = {"model": str(tmp_path / name / "model"), "train_data": str(tmp_path / "train.npz"), **sampling}
        trak.write_features(
            output="loss",
            out=str(tmp_path / name / "f.npz"),
            family=spec,
            n_targets=3,
            n_trajectories=2,
            projection_dim=8,
            timesteps=2,
            log=lambda _: None,
            **options,
        )
        with np.load(tmp_path / name / "f.npz") as stored:
            assert stored["train"].shape == (len(data), 8) and stored["targets"].shape == (3, 8)
            assert stored["journey"].shape == (2, 8) and np.isfinite(stored["journey"]).all()
        targets = similarity.targets_for(
            target="generated",
            family=family,
            model=family.load(tmp_path / name / "model"),
            heldout_data=str(tmp_path / "heldout.npz"),
            n_targets=3,
            **sampling,
        )
        assert targets.shape == (3, 1, 8, 8) and targets.min() >= -1 and targets.max() <= 1  # decoded pixels
    trak.write_features(  # held-out targets of a conditional family, each under its caption
        output="squared_norm",
        out=str(tmp_path / "h.npz"),
        family=specs["text_lora"],
        target="heldout",
        heldout_data=str(tmp_path / "heldout.npz"),
        n_targets=3,
        projection_dim=8,
        timesteps=2,
        log=lambda _: None,
        **options,
    )
    with np.load(tmp_path / "h.npz") as stored:
        assert stored["targets"].shape == (3, 8) and np.isfinite(stored["targets"]).all()


# --- In-Run Data Shapley in every family ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout_glyphs():
    """Held-out items of a font no contributor of `glyphs` owns, with the same letters (the tokenizer's words)."""
    return load_glyphs({"dejavu-sansmono": CONTRIBUTOR_FONTS["dejavu-sansmono"]}, letters="AOX", size=8, seed=1)[0]


@pytest.fixture(scope="module")
def text_spec(tmp_path_factory, glyphs, heldout_glyphs, base):
    """A prepared text-LoRA family on the staged `base`, captions read from the glyph ids, held-out items captioned."""
    from diffcredit.families import prepare_family

    folder = tmp_path_factory.mktemp("text")
    tc.save_base(base, folder / "staged")
    model = {"family": "text_lora", "text_lora": {"base": str(folder / "staged"), "captions": "glyphs", "rank": 2}}
    prepare_family(model, folder / "family", data=glyphs[0], heldout=heldout_glyphs, seed=0, log=lambda _: None)
    return {"model": model, "directory": str(folder / "family")}


def test_the_text_family_captions_the_held_out_items_its_source_can_caption(
    tmp_path, glyphs, heldout_glyphs, text_spec
):
    from diffcredit.families import _heldout_captions, family_of

    family = family_of(text_spec, glyphs[0].images.shape[1:])
    assert family.heldout_captions == dict(
        zip(heldout_glyphs.item_ids, captions_of(heldout_glyphs.item_ids), strict=True)
    )
    assert family.prompts == [caption("A"), caption("O"), caption("X")]  # the held-out captions add no prompt
    by_caption = family.conditions(heldout_glyphs)
    torch.testing.assert_close(by_caption, family.conditions(glyphs[0])[: len(heldout_glyphs)])  # same letters
    reference = ContributorData(heldout_glyphs.images[:2], ["ref", "ref"], ["img0", "dejavu-sansmono-A0"])
    assert _heldout_captions("glyphs", None, reference.item_ids) == {"dejavu-sansmono-A0": caption("A")}
    assert _heldout_captions(None, "a glyph", reference.item_ids) == {
        "img0": "a glyph",
        "dejavu-sansmono-A0": "a glyph",
    }
    with pytest.raises(ValueError, match=r"1 of 2 items have no caption, e\.g\. \['img0'\]; add them to the captions"):
        family.conditions(reference)


@pytest.mark.parametrize(("name", "lr"), [("latent", 5e-4), ("text_lora", 0.05)])  # a loss change well above fp32's
def test_inrun_in_each_family_sums_to_its_validation_loss_change_over_the_trained_weights(
    name, lr, glyphs, heldout_glyphs, latent_spec, text_spec, tmp_path
):
    """Σφ over a short SGD run of the family's own training (latents; the LoRA under each item's caption) equals the
    change of the validation loss where that UNet denoises, to second order; the text family credits its LoRA only."""
    from diffcredit.attribution import inrun
    from diffcredit.families import family_of

    data = glyphs[0]
    heldout_glyphs.save(tmp_path / "heldout.npz")
    family = family_of({"latent": latent_spec, "text_lora": text_spec}[name], data.images.shape[1:])
    model = family.build(seed=0)
    if name == "text_lora":
        _randomise_lora(model)  # B = 0 would leave A without gradient
    observer = inrun.observer_for(family, data, str(tmp_path / "heldout.npz"), seed=0, validation_batch_size=None)
    assert observer.val.shape[1:] == family.inputs(data).shape[1:]  # validated where the UNet denoises
    assert (observer.val_conditions is None) == (name == "latent")
    before = float(observer.validation_loss(model))
    options = {"steps": 3, "batch_size": 6, "lr": lr, "optimizer": "sgd", "grad_clip": None, "log_every": 0}
    family.fit(model, data, seed=1, observer=observer, device="cpu", **options)
    measured = before - float(observer.validation_loss(model))
    assert observer.steps == 3 and abs(measured) > 1e-5
    total = (observer.first + observer.second).sum()
    assert total == pytest.approx(measured, rel=5e-3)
    assert abs(total - measured) < 0.5 * abs(observer.first.sum() - measured)  # the second order helps
    names, _ = inrun._trainable(model)
    assert (name == "text_lora") == all("lora" in n for n in names)


def test_train_full_accumulates_inrun_in_the_text_family_and_the_replay_reproduces_it(
    tmp_path, glyphs, heldout_glyphs, text_spec
):
    from diffcredit import stages
    from diffcredit.attribution import inrun

    glyphs[0].save(tmp_path / "train.npz")
    heldout_glyphs.save(tmp_path / "heldout.npz")
    recipe = {"seed": 0, "steps": 2, "batch_size": 4, "lr": 1e-2, "optimizer": "sgd", "family": text_spec}
    options = {"order": 2, "validation_batch_size": 4}
    stages.train_full(
        train_data=str(tmp_path / "train.npz"),
        out=str(tmp_path / "full"),
        stats_out=str(tmp_path / "full.json"),
        inrun={"heldout_data": str(tmp_path / "heldout.npz"), "out": str(tmp_path / "inrun.csv"), **options}
        | {"first_order_out": None},
        **recipe,
    )
    values = pd.read_csv(tmp_path / "inrun.csv").set_index("contributor")
    assert list(values.index) == glyphs[0].contributor_ids and (values["steps"] == 2).all()
    assert (values["second_order"] != 0).all()
    logged = []
    replayed = inrun.replay_values(
        train_data=str(tmp_path / "train.npz"),
        heldout_data=str(tmp_path / "heldout.npz"),
        full_model=str(tmp_path / "full"),
        out=str(tmp_path / "replay.csv"),
        log=logged.append,
        **options,
        **recipe,
    )
    np.testing.assert_allclose(replayed["value"], values["value"], rtol=1e-12)
    assert logged[0] == "replayed run ends 0 (max abs weight difference) from the saved full model"


def test_stored_utilities_follow_the_prepared_folders_content_not_its_path(tmp_path, glyphs, latent_spec, text_spec):
    import shutil

    from diffcredit.families import prepare_family
    from diffcredit.stages import utility_settings

    def fingerprint(spec):  # the settings as the coalition jobs make them, the family's UNet config included
        workflow = {"mode": "sft", "steps": 1, "batch_size": 8, "lr": 1e-3, "schedule": {}, "property": "fid"}
        return utility_settings(glyphs[0], {**workflow, "seed": 0, "family": spec}).fingerprint()

    model = {"family": "text_lora", "text_lora": {"captions": "glyphs", "rank": 2, "steps": 2, "batch_size": 8}}
    prepare_family(model, tmp_path / "standin", data=glyphs[0], seed=0, device="cpu", log=lambda _: None)
    standin = {"model": model, "directory": str(tmp_path / "standin")}  # the base trained inside the folder
    for name, spec in (("latent", latent_spec), ("text", text_spec), ("moved-standin", standin)):
        moved = {**spec, "directory": str(shutil.copytree(spec["directory"], tmp_path / name))}
        assert fingerprint(moved) == fingerprint(spec)  # a copied run folder reuses its records
    weights = next((tmp_path / "latent" / "autoencoder").glob("*.safetensors"))
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # the same path, other weights
    assert fingerprint({**latent_spec, "directory": str(tmp_path / "latent")}) != fingerprint(latent_spec)
    (tmp_path / "text" / "captions.tsv").write_text("item\tcaption\n")
    assert fingerprint({**text_spec, "directory": str(tmp_path / "text")}) != fingerprint(text_spec)
