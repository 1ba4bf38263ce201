"""Train, prune and recover the embedded default model on CPU, and write grids of its samples beside real digits.

    python -m diffcredit.demo --out results/demo [--steps 2000 --recover-steps 1000 --ratio 0.5 --seed 0]

Writes ``samples.png`` (real | full | pruned | recovered), one model directory per stage and ``demo.json`` with the
seconds of every stage and the parameter counts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffcredit.contributors import load_digits, split_heldout
from diffcredit.models import build_model, count_parameters, digits_unet_config, save_model
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
    args = parser.parse_args(argv)

    train_data, heldout = split_heldout(load_digits(), args.heldout, derive_seed(args.seed, "split"))
    fit = {"batch_size": args.batch_size, "lr": args.lr, "log_every": 250}
    seconds: dict[str, float] = {}
    samples: dict[str, np.ndarray] = {"real (held out)": heldout.images[: args.samples]}

    def sample(label: str, model) -> None:
        start = time.perf_counter()
        samples[label] = generate(model, args.samples, seed=derive_seed(args.seed, "generation"))
        seconds[f"sample_{label}"] = time.perf_counter() - start

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
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
    }
    (args.out / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["seconds"]))


if __name__ == "__main__":
    main()
