"""Does the text-LoRA stand-in's base draw the letter it is prompted with, with its text encoder frozen or trained?

The glyphs-lora preset's base exactly as `prepare_family` builds it (`tiny_base` over the contributors' and the base
fonts' captions, pre-trained on the base fonts' glyphs with the preset's steps, batch and learning rate, the run
seed's derived seeds), once per ``--variant`` (``frozen:0.1``: the text encoder frozen at its initialisation
(`model.text_lora.train_text_encoder: false`) and caption dropout 0.1 (`model.text_lora.caption_dropout`);
``trained:0.1``: the encoder trained with the UNet; ``trained:0.1:1``: and the loss weighted by Min-SNR-γ with γ = 1
(`model.text_lora.snr_gamma`)), each in its own process on one thread. Each base generates 4
images per letter, prompted "the letter X", with DPM-Solver++ 10 steps at each ``--guidance`` scale from the same
noise; a letter classifier (diffcredit's small CNN, trained on every glyph of the contributor and base fonts, letter
labels) reads each image, and the share read as its prompted letter is the *letter accuracy* (chance: 1/26 = 3.8%).
Writes the section "## Text conditioning of the stand-in base" of benchmarks/RESULTS.md. Run:
``.venv/bin/python benchmarks/bench_text_conditioning.py`` (about 15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_description, replace_section, table_head

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_LETTER = 4


ENCODER = {"frozen": False, "trained": True}


def parse_variant(variant: str) -> tuple[str, float, float | None]:
    """``frozen:0.1`` -> ("frozen", 0.1, None), ``trained:0.1:1`` -> ("trained", 0.1, 1.0); ValueError naming the
    form otherwise."""
    encoder, *numbers = variant.split(":")
    if encoder not in ENCODER or len(numbers) not in (1, 2) or not all(_is_number(x) for x in numbers):
        raise ValueError(
            f"--variant {variant!r}: give frozen:<dropout> or trained:<dropout>, optionally :<min-SNR gamma>, "
            "e.g. trained:0.1 or trained:0.1:1"
        )
    return encoder, float(numbers[0]), float(numbers[1]) if len(numbers) == 2 else None


def _is_number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()


def measure(variant: str, steps: int, guidance: list[float], seed: int, channels: list[int]) -> dict:
    """Pre-train one base and return its letter accuracy per guidance scale."""
    import numpy as np
    import torch

    from diffcredit.families import text_conditioning as tc
    from diffcredit.glyphs import BASE_FONTS, LETTERS, caption, load_glyphs
    from diffcredit.properties.features import predict_log_probs, train_classifier
    from diffcredit.seeds import derive_seed

    encoder, dropout, snr_gamma = parse_variant(variant)
    torch.set_num_threads(1)
    base_glyphs, base_captions = load_glyphs(BASE_FONTS, size=16, seed=derive_seed(seed, "base-glyphs"))
    contributors, contributor_captions = load_glyphs(size=16, seed=seed)
    pipeline = tc.tiny_base(
        [*contributor_captions, *base_captions],
        sample_size=16,
        seed=derive_seed(seed, "base-init"),
        unet={"block_out_channels": channels},
    )
    tic = time.perf_counter()
    result = tc.pretrain(
        pipeline,
        base_glyphs.images,
        base_captions,
        steps=steps,
        batch_size=32,
        lr=1e-3,
        seed=derive_seed(seed, "base-train"),
        caption_dropout=dropout,
        train_text_encoder=ENCODER[encoder],
        snr_gamma=snr_gamma,
        log_every=0,
    )
    seconds = time.perf_counter() - tic
    reader = train_classifier(
        np.concatenate([base_glyphs.images, contributors.images]),
        np.concatenate([base_glyphs.labels, contributors.labels]),
        seed=1,
        steps=800,
    )
    n = SAMPLES_PER_LETTER * len(LETTERS)
    accuracy = {}
    for scale in guidance:
        images = tc.generate(
            pipeline,
            pipeline.unet,
            [caption(letter) for letter in LETTERS],
            n,
            seed=5,
            guidance_scale=scale,
            inference_steps=10,
            sampler="dpmsolver++",
        )
        read = predict_log_probs(reader, images).argmax(1)
        accuracy[f"{scale:g}"] = float(np.mean(read == np.arange(n) % len(LETTERS)))
    return {
        "text_encoder": encoder,
        "dropout": dropout,
        "snr_gamma": snr_gamma,
        "seconds": seconds,
        "final_loss": float(np.mean(result.losses[-50:])),
        "accuracy": accuracy,
    }


def markdown(rows: list[dict], steps: int, channels: list[int]) -> str:
    scales = list(rows[0]["accuracy"])
    lines = [
        f"`.venv/bin/python benchmarks/bench_text_conditioning.py` on {time.strftime('%Y-%m-%d')}, "
        f"{machine_description()}. The glyphs-lora stand-in base (UNet channels {'/'.join(map(str, channels))}) "
        f"pre-trained {steps} steps (batch 32, lr 1e-3) on "
        "the 8 base fonts' 416 glyphs (a min-SNR row's final loss is its weighted one); letter accuracy = share of "
        "104 prompted samples (4 per letter, DPM-Solver++ 10 steps) that a letter classifier reads as the prompted "
        "letter; chance 3.8%.",
        "",
        *table_head(
            "text encoder",
            "caption dropout",
            "min-SNR γ",
            "pre-training (s, one thread)",
            "final loss",
            *(f"guidance {s}" for s in scales),
        ),
    ]
    for row in rows:
        lines.append(
            f"| {row['text_encoder']} | {row['dropout']:g} | {_gamma(row.get('snr_gamma'))} | {row['seconds']:.0f} | "
            f"{row['final_loss']:.4f} | " + " | ".join(f"{100 * row['accuracy'][s]:.1f}%" for s in scales) + " |"
        )
    return "\n".join(lines)


def _gamma(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def main(argv: list[str] | None = None) -> None:
    from diffcredit.families.text_conditioning import tiny_unet_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        nargs="+",
        default=["frozen:0", "frozen:0.1", "trained:0", "trained:0.1", "trained:0.1:1"],
        help="text encoder (frozen or trained) : caption dropout [: min-SNR gamma]",
    )
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--steps", type=int, default=1200)  # the glyphs-lora preset's model.text_lora.steps
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--channels",
        type=int,
        nargs=2,
        default=tiny_unet_config()["block_out_channels"],
        help="the base UNet's block_out_channels (default: the stand-in's)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: measure one variant, print JSON
    args = parser.parse_args(argv)
    for variant in args.variant:
        try:
            parse_variant(variant)
        except ValueError as error:
            parser.error(str(error))
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps, args.guidance, args.seed, args.channels)))
        return
    common = [
        *("--steps", str(args.steps), "--seed", str(args.seed), "--guidance", *map(str, args.guidance)),
        *("--channels", *map(str, args.channels)),
    ]
    workers = [
        subprocess.Popen([sys.executable, __file__, "--one", variant, *common], stdout=subprocess.PIPE, text=True)
        for variant in args.variant
    ]
    rows = []
    for worker in workers:
        out, _ = worker.communicate()
        if worker.returncode:
            raise SystemExit(f"a worker failed (exit {worker.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    text = markdown(rows, args.steps, args.channels)
    replace_section(ROOT / "benchmarks" / "RESULTS.md", "Text conditioning of the stand-in base", text)
    print(text)


if __name__ == "__main__":
    main()
