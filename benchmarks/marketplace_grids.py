"""The sample grid of each planted contributor of a finished marketplace run: its items beside its model's samples.

Usage: python benchmarks/marketplace_grids.py results/<name> [--out docs/images/marketplace] [--estimator kernelshap]
(a few seconds; reads only the run folder). For every planted contributor of ``data.source: marketplace`` (all but
the clean classes digit0..digit4), ``<out>/<contributor>.png`` shows up to 64 of its training items beside the first 64
samples of its singleton coalition, the pruned model fine-tuned on its items alone, when the plan measured that
coalition and the run kept its samples (``keep.samples: true``; the first repeat). Prints one line per figure.
"""

import argparse
from pathlib import Path

import numpy as np

from diffcredit.coalitions import member_sets, read_coalitions
from diffcredit.contributors import MARKETPLACE_CLASSES, ContributorData
from diffcredit.sampling import save_grid

SHOWN = 64  # images per panel: an 8×8 grid


def main(run: Path, out: Path, estimator: str = "kernelshap", mode: str = "sft") -> None:
    data = ContributorData.load(run / "data" / "train.npz")
    clean = {f"digit{label}" for label in MARKETPLACE_CLASSES}
    planted = [c for c in data.contributor_ids if c not in clean]
    singletons = {
        members[0]: coalition
        for coalition, members in member_sets(read_coalitions(run / "plans" / f"{estimator}.tsv")).items()
        if len(members) == 1
    }
    for contributor in planted:
        items = data.images[data.contributors == contributor]
        panels = {f"{contributor}: {min(len(items), SHOWN)} of its {len(items)} items": items[:SHOWN]}
        kept = run / mode / estimator / "kept" / singletons.get(contributor, "-") / "repeat0" / "samples.npz"
        if kept.is_file():
            with np.load(kept) as stored:
                samples = stored["samples"]
            panels[f"trained on {contributor} alone: {min(len(samples), SHOWN)} samples"] = samples[:SHOWN]
            said = f"items beside the samples of {singletons[contributor]}"
        else:
            said = "items only (its singleton coalition was not measured or its samples not kept)"
        save_grid(panels, out / f"{contributor}.png", nrow=8)
        print(f"{out / contributor}.png: {said}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished marketplace run folder (results/<name>)")
    parser.add_argument("--out", type=Path, default=Path("docs/images/marketplace"), help="folder of the PNGs")
    parser.add_argument("--estimator", default="kernelshap", help="the run's estimator (names its plan)")
    parser.add_argument("--mode", default="sft", help="the run's utility.mode")
    args = parser.parse_args()
    main(args.run, args.out, args.estimator, args.mode)
