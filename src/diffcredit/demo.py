"""Train, prune and recover the embedded default model on CPU, and write grids of its samples beside real digits.

    python -m diffcredit.demo --out results/demo [--steps 2000 --recover-steps 1000 --ratio 0.5 --seed 0]

Writes ``samples.png`` (real | full | pruned | recovered), one model directory per stage and ``demo.json`` with the
seconds of every stage, the parameter counts and the FID of each stage against the held-out digits (features of the
workflow's own seeded digit classifier; ``--fid-samples`` generated images per stage, the same noise for each).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffcredit.contributors import load_digits, split_heldout
from diffcredit.models import build_model, count_parameters, digits_unet_config, save_model
from diffcredit.progress import log_to_stderr
from diffcredit.properties import load_property, prepare_reference
from diffcredit.pruning import prune
from diffcredit.sampling import generate, save_grid
from diffcredit.seeds import derive_seed
from diffcredit.training import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffcredit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of the full model")
    parser.add_argument("--recover-steps", type=int, default=1000, help="fine-tuning steps after pruning")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of channels pruned per layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=64, help="generated images per model")
    parser.add_argument("--heldout", type=float, default=0.2, help="share of each digit kept out of training")
    parser.add_argument("--fid-samples", type=int, default=512, help="generated images per stage for its FID")
    parser.add_argument("--classifier-steps", type=int, default=1500, help="training steps of the FID classifier")
    args = parser.parse_args(argv)
    # progress of training and sampling (rate, ETA) in the terminal
    log_to_stderr()

    train_data, heldout = split_heldout(load_digits(), args.heldout, derive_seed(args.seed, "split"))
    fit = {"batch_size": args.batch_size, "lr": args.lr}
    seconds: dict[str, float] = {}
    samples: dict[str, np.ndarray] = {"real (held out)": heldout.images[: args.samples]}
    fid: dict[str, float] = {}
    prepare_reference(
        args.out / "reference",
        train_images=train_data.images,
        train_labels=train_data.labels,
        reference_images=heldout.images,
        seed=derive_seed(args.seed, "features"),
        classifier_steps=args.classifier_steps,
    )
    score = load_property("fid", args.out / "reference")
    fid["real held out vs real train"] = score(train_data.images)

    def sample(label: str, model) -> None:
        start = time.perf_counter()
        images = generate(
            model, max(args.samples, args.fid_samples), seed=derive_seed(args.seed, "generation"), log_every=None
        )
        seconds[f"sample_{label}"] = time.perf_counter() - start
        samples[label] = images[: args.samples]
        fid[label] = score(images[: args.fid_samples])

    full = build_model(digits_unet_config(), seed=derive_seed(args.seed, "init"))
    seconds["train"] = train(
        full, train_data.images, steps=args.steps, seed=derive_seed(args.seed, "train"), **fit
    ).seconds
    save_model(full, args.out / "full")
    sample("full", full)

    start = time.perf_counter()
    pruned = prune(full, args.ratio)
    seconds["prune"] = time.perf_counter() - start
    save_model(pruned, args.out / "pruned")
    sample("pruned", pruned)

    seconds["recover"] = train(
        pruned, train_data.images, steps=args.recover_steps, seed=derive_seed(args.seed, "recover"), **fit
    ).seconds
    save_model(pruned, args.out / "recovered")
    sample("recovered", pruned)

    save_grid(samples, args.out / "samples.png", nrow=8)
    report = {
        "seconds": {stage: round(value, 2) for stage, value in seconds.items()},
        "parameters": {"full": count_parameters(full), "pruned": count_parameters(pruned)},
        "fid": {stage: round(value, 3) for stage, value in fid.items()},
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
    }
    (args.out / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({key: report[key] for key in ("seconds", "fid")}, indent=1))


if __name__ == "__main__":
    main()
