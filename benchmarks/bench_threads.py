"""Torch threads in the stages that run alone: seconds per training step at one and two threads, and whether the
bytes depend on the thread count or on the cores the threads get.

The models are those of the solo stages (workflow/rules/common.smk, SOLO_THREADS): the digits UNet (pixel family),
the same UNet on the latent stand-in's 8x8x3 latents, the stand-in's tiny VQModel and the glyphs-lora base (UNet and
text encoder). Each measurement runs in a fresh process: warm-up steps, then timed steps of the function the stage
calls (``training.train``, ``train_autoencoder``, the base's ``pretrain``) on seeded random images (the base: its
glyphs), then a hash of the weights. "one core" runs the two-thread process under ``taskset -c 0`` (what
``--cores 1`` gives a job).

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
MODELS = ("pixel UNet, batch 64", "latent UNet, batch 64", "VQModel, batch 32", "text base pre-training, batch 32")
WARMUP, STEPS = 5, 50


def training_run(model_name: str):
    """(model, run) for one of MODELS: ``run(steps)`` trains the model in place with the function its stage calls."""
    import numpy as np

    from diffcredit import models
    from diffcredit.families import autoencoder
    from diffcredit.training import train

    rng = np.random.default_rng(0)
    if model_name.startswith("VQModel"):
        model = autoencoder.build_autoencoder(autoencoder.tiny_autoencoder_config(), seed=0)
        images = rng.uniform(-1, 1, (512, 1, 16, 16)).astype(np.float32)
        return model, lambda steps: autoencoder.train_autoencoder(
            model, images, steps=steps, batch_size=32, lr=1e-3, seed=0, device="cpu"
        )
    if model_name.startswith("text"):
        from diffcredit.families import text_conditioning
        from diffcredit.glyphs import BASE_FONTS, load_glyphs

        glyphs, captions = load_glyphs(BASE_FONTS, size=16, seed=0)
        pipeline = text_conditioning.tiny_base(list(captions), sample_size=16, seed=0)
        return pipeline.unet, lambda steps: text_conditioning.pretrain(
            pipeline,
            glyphs.images,
            captions,
            steps=steps,
            batch_size=32,
            lr=1e-3,
            seed=0,
            caption_dropout=0.1,
            device="cpu",
        )
    channels = 3 if model_name.startswith("latent") else 1
    model = models.build_model(models.unet_config_for((1, channels, 8, 8)), seed=0)
    images = rng.uniform(-1, 1, (512, channels, 8, 8)).astype(np.float32)
    return model, lambda steps: train(model, images, steps=steps, batch_size=64, lr=1e-3, seed=0, device="cpu")


def worker(model_name: str, threads: int) -> dict:
    import hashlib
    import time

    import torch

    torch.set_num_threads(threads)
    model, run = training_run(model_name)
    run(WARMUP)
    start = time.perf_counter()
    run(STEPS)
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
            f"{versions}. {STEPS} training steps of the stage's own function after {WARMUP} warm-up steps, each "
            "measurement in a fresh process; "
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
