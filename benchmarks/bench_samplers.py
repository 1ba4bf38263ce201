"""Which sampler, with how few steps, keeps the coalition utilities of the reference sampler (DDIM, 100 steps)?

On the embedded default (digits, CPU): the workflow's own stages build the full, pruned and recovered models and the
FID reference (classifier features) from config/config.yaml, into a cache folder that later runs reuse. Then ~12
coalitions of varied size are fine-tuned once each (sft mode, k steps, as `utility.coalition_model` does) and every
fine-tuned model generates with each sampler at each step count, from the workflow's common generation noise. Written:

- the FID (mean over the coalitions) and the CPU seconds of generation against steps, per sampler;
- the Spearman of the coalition utilities (−FID) against the reference sampler's;
- per sampler, the fewest steps with Spearman ≥ 0.99, and the cheapest of those choices;

into the section "## Samplers: property and agreement against steps" of benchmarks/RESULTS.md, with a figure
benchmarks/samplers.png. Run: ``.venv/bin/python benchmarks/bench_samplers.py`` (about 15 minutes on 2 idle cores, of
which ~8 build the models once). Each coalition generates ``--n-samples`` images per setting (256 by default, half the
config's 512, to keep the run short; with common noise the comparison of samplers stays paired).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from machine import machine_description, package_versions, replace_section
from scipy.stats import spearmanr

from diffcredit import stages
from diffcredit.contributors import ContributorData
from diffcredit.models import unet_config_for
from diffcredit.properties import load_property
from diffcredit.sampling import generate
from diffcredit.seeds import derive_seed
from diffcredit.utility import UtilitySettings, coalition_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
FIGURE = Path(__file__).with_name("samplers.png")
SECTION = "Samplers: property and agreement against steps"
REFERENCE = ("ddim", 100)
GRID = {  # steps tried per sampler
    "ddim": (25,),
    "dpmsolver++": (5, 10, 15),
    "unipc": (5, 10, 15),
}
# The noise floor: the reference sampler again under another generation noise. No sampler can agree with the
# reference better than the reference agrees with itself across noise draws.
NOISE_FLOOR = ("ddim", 100, "other noise")
N_SAMPLES = 256  # images per coalition: half the default's 512, to keep the run near 15 CPU minutes
AGREEMENT = 0.99


def config() -> dict:
    """The embedded default (config/config.yaml spells out every key this benchmark reads)."""
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def build_inputs(cfg: dict, cache: Path) -> tuple[Path, Path, Path, dict]:
    """The workflow's train split, recovered model and FID reference for `cfg`, built once into `cache`."""
    keys = ("seed", "data", "model", "train", "prune", "recover", "features")
    cache = cache / hashlib.sha256(json.dumps({k: cfg[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    seconds_file = cache / "stage_seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    seed, data, model = cfg["seed"], cfg["data"], cfg["model"]

    def recipe(section: str) -> dict:  # as common.smk's training_settings: each section is complete in the schema
        return {k: cfg[section][k] for k in ("steps", "batch_size", "lr", "optimizer", "ema_decay", "grad_clip")}

    stages_run = {
        "prepare_data": (
            cache / "train.npz",
            lambda: stages.prepare_data(
                source=data["source"],
                path=data["path"],
                manifest=data["manifest"],
                heldout_fraction=data["heldout_fraction"],
                seed=seed,
                train_out=str(cache / "train.npz"),
                heldout_out=str(cache / "heldout.npz"),
                contributors_out=str(cache / "contributors.tsv"),
            ),
        ),
        "train_full": (
            cache / "full",
            lambda: stages.train_full(
                train_data=str(cache / "train.npz"),
                out=str(cache / "full"),
                stats_out=str(cache / "full.json"),
                unet=model["unet"],
                schedule=model["schedule"],
                seed=seed,
                **recipe("train"),
            ),
        ),
        "prune": (
            cache / "pruned",
            lambda: stages.prune_model(
                full_model=str(cache / "full"),
                train_data=str(cache / "train.npz"),
                out=str(cache / "pruned"),
                stats_out=str(cache / "pruned.json"),
                schedule=model["schedule"],
                seed=seed,
                **cfg["prune"],
            ),
        ),
        "recover": (
            cache / "recovered",
            lambda: stages.recover(
                pruned_model=str(cache / "pruned"),
                train_data=str(cache / "train.npz"),
                out=str(cache / "recovered"),
                stats_out=str(cache / "recovered.json"),
                schedule=model["schedule"],
                seed=seed,
                **recipe("recover"),
            ),
        ),
        "reference": (
            cache / "reference",
            lambda: stages.prepare_reference(
                train_data=str(cache / "train.npz"),
                heldout_data=str(cache / "heldout.npz"),
                out=str(cache / "reference"),
                seed=seed,
                **cfg["features"],
            ),
        ),
    }
    for stage, (output, run) in stages_run.items():
        if not output.exists():
            tic = time.perf_counter()
            run()
            seconds[stage] = time.perf_counter() - tic
            seconds_file.write_text(json.dumps(seconds, indent=1))
            print(f"{stage}: {seconds[stage]:.1f} s", flush=True)
    return cache / "train.npz", cache / "recovered", cache / "reference", seconds


def choose_coalitions(contributors: list[str], count: int, seed: int) -> list[list[str]]:
    """`count` coalitions with sizes spread evenly over 1..n (the grand coalition included), members seeded."""
    rng = np.random.default_rng(derive_seed(seed, "bench-samplers-coalitions"))
    sizes = np.round(np.linspace(1, len(contributors), count)).astype(int)
    return [sorted(rng.choice(contributors, size=int(k), replace=False).tolist()) for k in sizes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "results/bench_samplers")
    parser.add_argument("--n-samples", type=int, default=N_SAMPLES, help="images per coalition")
    parser.add_argument("--coalitions", type=int, default=12)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine's cores are shared; one thread is also what a coalition job gets
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()

    cfg = config()
    train_file, recovered, reference, stage_seconds = build_inputs(cfg, args.cache)
    data = ContributorData.load(train_file)
    u = cfg["utility"]
    n_samples = args.n_samples
    settings = UtilitySettings(
        mode="sft",
        steps=u["finetune_steps"],
        batch_size=u["batch_size"],
        lr=u["lr"],
        model_config=unet_config_for(data.images.shape, cfg["model"]["unet"]),
        schedule=cfg["model"]["schedule"],
        property="fid",
        seed=cfg["seed"],
        optimizer=cfg["train"]["optimizer"],
        grad_clip=cfg["train"]["grad_clip"],
        n_samples=n_samples,
    )
    fid = load_property("fid", reference)
    noise_seed = derive_seed(cfg["seed"], "generation-noise")
    coalitions = choose_coalitions(sorted(set(data.contributors)), args.coalitions, cfg["seed"])
    configs = [REFERENCE, NOISE_FLOOR] + [(s, k) for s, steps in GRID.items() for k in steps if (s, k) != REFERENCE]
    other_noise_seed = derive_seed(cfg["seed"], "bench-samplers-other-noise")
    values = {c: [] for c in configs}
    sample_seconds = {c: [] for c in configs}
    finetune_seconds, score_seconds = [], []
    for number, members in enumerate(coalitions, 1):
        model, seconds = coalition_model(members, 0, data=data, settings=settings, start_model=recovered, device="cpu")
        finetune_seconds.append(seconds["train"])
        for setting in configs:
            sampler, steps = setting[:2]
            tic = time.process_time()  # CPU seconds of this one-thread process: what an idle core would take
            images = generate(
                model,
                n_samples,
                seed=other_noise_seed if setting is NOISE_FLOOR else noise_seed,
                inference_steps=steps,
                sampler=sampler,
                schedule=settings.schedule,
                device="cpu",
            )
            sample_seconds[setting].append(time.process_time() - tic)
            tic = time.process_time()
            values[setting].append(fid(images))
            score_seconds.append(time.process_time() - tic)
        print(
            f"coalition {number}/{len(coalitions)} ({len(members)} members): FID {values[REFERENCE][-1]:.2f} "
            f"with {REFERENCE[0]} {REFERENCE[1]}; {time.perf_counter() - started:.0f} s so far",
            flush=True,
        )

    reference_utilities = -np.asarray(values[REFERENCE])
    rows = []
    for setting in configs:
        rho = spearmanr(reference_utilities, -np.asarray(values[setting])).statistic
        rows.append(
            {
                "sampler": setting[0],
                "steps": setting[1],
                "noise": "other" if setting is NOISE_FLOOR else "common",
                "fid": float(np.mean(values[setting])),
                "spearman": float(rho),
                "seconds": float(np.median(sample_seconds[setting])),
            }
        )
    floor = rows[1]["spearman"]
    threshold = min(AGREEMENT, floor)  # 0.99, unless the reference agrees less with itself under other noise
    chosen = {}
    for sampler in GRID:
        passing = [r for r in rows[2:] if r["sampler"] == sampler and r["spearman"] >= threshold]
        if passing:
            chosen[sampler] = min(passing, key=lambda r: r["steps"])
    best = min(chosen.values(), key=lambda r: (r["steps"], r["seconds"])) if chosen else None
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "versions": package_versions(),
        "n_samples": n_samples,
        "finetune_steps": settings.steps,
        "coalition_sizes": [len(c) for c in coalitions],
        "rows": rows,
        "chosen": chosen,
        "best": best,
        "stage_seconds": stage_seconds,
        "noise_floor": floor,
        "threshold": threshold,
        "finetune_seconds_median": float(np.median(finetune_seconds)),
        "score_seconds_median": float(np.median(score_seconds)),
        "wall_seconds": time.perf_counter() - started,
    }
    (args.cache / "bench_samplers.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("best", "chosen", "wall_seconds")}, indent=1))
    if not args.no_write:
        plot(rows, FIGURE)
        replace_section(RESULTS, SECTION, markdown(report))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for sampler in ["ddim", *(s for s in GRID if s != "ddim")]:
        mine = sorted((r for r in rows if r["sampler"] == sampler and r["noise"] == "common"), key=lambda r: r["steps"])
        steps = [r["steps"] for r in mine]
        left.plot(steps, [r["fid"] for r in mine], "o-", label=sampler)
        right.plot(steps, [r["spearman"] for r in mine], "o-", label=sampler)
    left.set(
        xscale="log", xlabel="inference steps", ylabel="FID (mean over coalitions)", title="property against steps"
    )
    right.axhline(AGREEMENT, color="gray", linestyle=":")
    right.axhline(rows[1]["spearman"], color="black", linestyle="--", label="DDIM 100, other noise")
    right.set(
        xscale="log",
        xlabel="inference steps",
        ylabel="Spearman with DDIM 100",
        title="agreement of coalition utilities",
        ylim=(max(0.0, min(r["spearman"] for r in rows) - 0.05), 1.005),
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    lines = [
        f"Command: `.venv/bin/python benchmarks/bench_samplers.py`. Machine: {report['machine']}. "
        f"Date: {report['date']}. Wall time: {report['wall_seconds']:.0f} s (of it, building the models and the "
        f"reference once: {sum(report['stage_seconds'].values()):.0f} s). Packages: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        "",
        f"The embedded default (config/config.yaml) built by the workflow's stages; {len(report['coalition_sizes'])} "
        f"coalitions of sizes {', '.join(map(str, report['coalition_sizes']))} fine-tuned once each (sft, k = "
        f"{report['finetune_steps']} steps, median {report['finetune_seconds_median']:.1f} s), then sampled "
        f"{report['n_samples']} images with every setting from the same generation noise; FID with the workflow's "
        f"classifier features against the held-out digits (median {report['score_seconds_median']:.2f} s). Spearman: "
        "coalition utilities (−FID) against DDIM at 100 steps. Seconds: median CPU seconds of one coalition's "
        "generation (one thread).",
        "",
        "| sampler | steps | noise | FID (mean) | Spearman vs DDIM 100 | CPU seconds per coalition |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['noise']} | {r['fid']:.2f} | {r['spearman']:.3f} | "
            f"{r['seconds']:.2f} |"
        )
    lines += [
        "",
        f"Noise floor: DDIM 100 under another generation noise agrees with itself at Spearman "
        f"{report['noise_floor']:.3f}; the bar is min(0.99, that) = {report['threshold']:.3f}.",
        "Fewest steps reaching it, per sampler: "
        + (", ".join(f"{s} {r['steps']} ({r['seconds']:.2f} s)" for s, r in report["chosen"].items()) or "none")
        + ".",
    ]
    if report["best"]:
        best = report["best"]
        ref = report["rows"][0]
        lines.append(
            f"Chosen default: **{best['sampler']}, {best['steps']} steps**: {ref['seconds'] / best['seconds']:.1f}× "
            "less generation time than the reference at Spearman "
            f"{best['spearman']:.3f}. Figure: `benchmarks/samplers.png`."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
