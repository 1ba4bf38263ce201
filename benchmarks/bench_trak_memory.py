"""Peak memory of the TRAK family's streamed projection on a preset's UNet, against what a dense projection needs.

Each (k, items) case runs in a fresh process: build the preset's UNet, take per-item D-TRAK gradients of a few
items (torch.func, as the baselines do), then project them block by block. Peak RSS is read before and after the
projection (``ru_maxrss``), so the projection's own share is the difference.

    .venv/bin/python benchmarks/bench_trak_memory.py config/presets/cifar20.yaml --dims 256 1024 --items 2
    .venv/bin/python benchmarks/bench_trak_memory.py config/presets/celebahq-ldm.yaml --shape 3 64 64 --share 0.01
    .venv/bin/python benchmarks/bench_trak_memory.py config/presets/artbench-lora.yaml --shape 4 32 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import yaml

SD1_STATES = (77, 768)  # CLIP ViT-L/14 text states of Stable Diffusion 1.x (miniSD): tokens x width


def measure(preset: str, dim: int, items: int, timesteps: int, share: float, item_shape: list[int] | None) -> dict:
    import numpy as np
    import torch

    from diffcredit.attribution.projection import StreamedProjection
    from diffcredit.attribution.trak import FeatureSpace
    from diffcredit.models import build_model, unet_config_for

    torch.set_num_threads(1)
    with open(preset) as handle:
        config = yaml.safe_load(handle)
    # what the preset's UNet denoises: --shape (a latent family's latents, set by its staged autoencoder), else 8x8
    # grey digits for the embedded data and 32x32 RGB for the CIFAR presets
    digits = config.get("data", {}).get("source", "digits") == "digits"
    shape = (items, *item_shape) if item_shape else (items, 1, 8, 8) if digits else (items, 3, 32, 32)
    model_config = config.get("model", {})
    conditions = None
    if model_config.get("family") == "text_lora":
        # The staged base is not here: a UNet of Stable Diffusion 1.x's shape (miniSD's: diffusers' default
        # UNet2DConditionModel with 768-wide CLIP states) with the preset's LoRA, whose parameters alone are TRAK's.
        from diffusers import UNet2DConditionModel

        from diffcredit.families.lora import add_lora

        model = UNet2DConditionModel(
            sample_size=shape[-1], in_channels=shape[1], out_channels=shape[1], cross_attention_dim=SD1_STATES[1]
        )
        add_lora(model, model_config["text_lora"]["rank"], seed=0)
        conditions = torch.randn(items, *SD1_STATES, generator=torch.Generator().manual_seed(0))
    else:
        model = build_model(unet_config_for(shape, model_config.get("unet", {})), seed=0)
    space = FeatureSpace.build(
        model, shape[1:], projection_dim=dim, timesteps=timesteps, seed=0, batch_size=items, device="cpu"
    )
    images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    # The per-item gradients alone (what any TRAK implementation holds), then the projection on top of them.
    from torch.func import grad, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffcredit.attribution import model_output

    def f(p, clean, *condition):
        clean = clean.expand(len(space.timesteps), *clean.shape)
        noisy = space.scheduler.add_noise(clean, space.noise, space.timesteps)
        states = condition[0].expand(len(space.timesteps), *condition[0].shape) if condition else None
        return model_output(space.model, p, noisy, space.timesteps, states).pow(2).mean()

    columns = [torch.from_numpy(images), *([] if conditions is None else [conditions])]
    with sdpa_kernel(SDPBackend.MATH):  # as the TRAK features: torch.func needs the unfused attention
        grads = vmap(grad(f), in_dims=(None, *[0] * len(columns)))(space.params, *columns)
    # With share < 1, only the first tensors (that share of the parameters) are projected: the peak memory does not
    # depend on how many blocks stream past, only the time does.
    projection = space.projection
    if share < 1:
        kept, total = {}, 0
        for name, size in projection.sizes.items():
            if total >= share * sum(projection.sizes.values()):
                break
            kept[name], total = size, total + size
        projection = StreamedProjection(kept, dim, projection.seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tic = time.perf_counter()
    features = projection.project({name: grads[name] for name in projection.sizes})
    seconds = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert features.shape == (items, dim)
    return {
        "parameters": sum(p.numel() for p in space.params.values()),  # those TRAK differentiates
        "dim": dim,
        "items": items,
        "peak_rss_before_projection": before,
        "peak_rss_after_projection": after,
        "projection_extra": after - before,
        "block_bytes": space.projection.block_bytes(),
        "dense_bytes": space.projection.dense_bytes(),
        "projection_seconds": seconds,
        "projected_parameters": sum(projection.sizes.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset")
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--timesteps", type=int, default=1)
    parser.add_argument(
        "--share",
        type=float,
        default=1.0,
        help="project only the first tensors, this share of the parameters (peak memory is the same; time scales)",
    )
    parser.add_argument(
        "--shape", type=int, nargs=3, metavar=("C", "H", "W"), help="what the UNet denoises (latent presets' latents)"
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.preset, args.dims[0], args.items, args.timesteps, args.share, args.shape)))
        return
    for dim in args.dims:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                args.preset,
                "--one",
                "--dims",
                str(dim),
                "--items",
                str(args.items),
                "--timesteps",
                str(args.timesteps),
                "--share",
                str(args.share),
                *(["--shape", *map(str, args.shape)] if args.shape else []),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        gib = 2**30
        print(
            f"{row['parameters']:,} parameters, k = {dim}, {row['items']} items: peak RSS "
            f"{row['peak_rss_before_projection'] / gib:.2f} GiB with the per-item gradients, "
            f"{row['peak_rss_after_projection'] / gib:.2f} GiB after projecting "
            f"(+{row['projection_extra'] / 2**20:.0f} MiB; one block {row['block_bytes'] / 2**20:.0f} MiB); "
            f"dense P would need {row['dense_bytes'] / gib:.1f} GiB; projection of "
            f"{row['projected_parameters']:,} parameters {row['projection_seconds']:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
