"""Torch threads in the stages that run alone: seconds per training step at one and two threads, and whether the
bytes depend on the thread count or on the cores the threads get.

The models are those of the solo stages (workflow/rules/common.smk, SOLO_THREADS): the digits UNet (pixel family),
the same UNet on the latent stand-in's 8x8x3 latents, the stand-in's tiny VQModel and the glyphs-lora base UNet. Each
measurement runs in a fresh process: warm-up steps, then timed steps of Adam on seeded batches, then a hash of the
weights. "one core" runs the two-thread process under ``taskset -c 0`` (what ``--cores 1`` gives a job).

Run: ``.venv/bin/python benchmarks/bench_threads.py`` (about four minutes). Prints the table and writes it into the
section "Torch threads of the solo stages" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

from machine import machine_description, package_versions, replace_section, table_head

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "Torch threads of the solo stages"
MODELS = ("pixel UNet, batch 64", "latent UNet, batch 64", "VQModel, batch 32", "text base UNet, batch 32")
WARMUP, STEPS = 5, 50


def step_function(model_name: str):
    """(model, loss of one seeded batch) for one of MODELS."""
    import torch
    import torch.nn.functional as F

    from diffcredit import models
    from diffcredit.families import autoencoder
    from diffcredit.families.text_conditioning import tiny_unet_config

    generator = torch.Generator().manual_seed(1)
    if model_name.startswith("VQModel"):
        model = autoencoder.build_autoencoder(autoencoder.tiny_autoencoder_config(), seed=0)

        def loss():
            images = torch.randn(32, 1, 16, 16, generator=generator)
            output = model(images)
            return F.mse_loss(output.sample, images) + output.commit_loss.mean()

        return model, loss
    if model_name.startswith("text"):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        model = UNet2DConditionModel(**tiny_unet_config(16, 1))
        shape, states = (32, 1, 16, 16), (32, 16, 32)
    else:
        channels = 3 if model_name.startswith("latent") else 1
        model = models.build_model(models.unet_config_for((1, channels, 8, 8)), seed=0)
        shape, states = (64, channels, 8, 8), None

    def loss():
        noise = torch.randn(shape, generator=generator)
        timesteps = torch.randint(0, 1000, (shape[0],), generator=generator)
        extra = {} if states is None else {"encoder_hidden_states": torch.randn(states, generator=generator)}
        return F.mse_loss(model(noise, timesteps, **extra).sample, noise)

    return model, loss


def worker(model_name: str, threads: int) -> dict:
    import hashlib
    import time

    import torch

    torch.set_num_threads(threads)
    model, loss = step_function(model_name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    seconds = (time.perf_counter() - start) / STEPS
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    return {"seconds": seconds, "hash": hashlib.sha256(weights).hexdigest()}


def measure(model_name: str, threads: int, one_core: bool = False) -> dict:
    command = [sys.executable, __file__, "--worker", model_name, "--threads", str(threads)]
    if one_core:
        command = ["taskset", "-c", "0", *command]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return
    pinned = shutil.which("taskset") is not None
    rows = table_head(
        "model",
        "1 thread (ms/step)",
        "2 threads (ms/step)",
        "speed-up",
        "same bytes as 1 thread",
        "2 threads on one core",
    )
    for name in MODELS:
        one, two = measure(name, 1), measure(name, 2)
        cell = "not measured (no taskset)"
        if pinned:
            alone = measure(name, 2, one_core=True)
            same = "same bytes" if alone["hash"] == two["hash"] else "OTHER BYTES"
            cell = f"{same}, {alone['seconds'] * 1000:.0f} ms/step"
        rows.append(
            f"| {name} | {one['seconds'] * 1000:.0f} | {two['seconds'] * 1000:.0f} | "
            f"{one['seconds'] / two['seconds']:.2f}x | {'yes' if one['hash'] == two['hash'] else 'no'} | {cell} |"
        )
        print(rows[-1], flush=True)
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items() if k in ("torch", "diffusers"))
    text = "\n".join(
        [
            f"`.venv/bin/python benchmarks/bench_threads.py` on {datetime.date.today()}, {machine_description()}; "
            f"{versions}. {STEPS} Adam steps after {WARMUP} warm-up steps, each measurement in a fresh process; "
            "bytes compared by a hash of the weights after the last step.",
            "",
            *rows,
            "",
        ]
    )
    if not args.no_write:
        replace_section(RESULTS, SECTION, text)


if __name__ == "__main__":
    main()
