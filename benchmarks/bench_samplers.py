"""Which sampler, with how few steps, keeps the coalition utilities of the reference sampler (unclipped DDIM, 100 steps)?

On the embedded default (digits, CPU): the workflow's own stages build the full, pruned and recovered models and the
FID reference (classifier features) from config/config.yaml, into a cache folder keyed by the stages' settings that
later runs reuse. Then ``--coalitions`` distinct coalitions (28; the grand coalition and sizes spread evenly over
1..n−1) are fine-tuned once each (sft mode, k steps, as `utility.coalition_model` does), and every fine-tuned model
generates the config's ``utility.n_samples`` images with each sampler at each step count, from the workflow's common
generation noise. Each coalition's FIDs are stored in the cache as they are measured, so a run that is stopped
resumes where it was. Written:

- the FID (mean over the coalitions) and the CPU seconds of generation against steps, per sampler;
- the Spearman of the coalition utilities (−FID) against the reference sampler's, with a bootstrap interval over
  coalitions and the share of bootstrap resamples in which the setting reaches the bar;
- the noise floor (the reference under another generation noise), the bar min(0.99, floor) and, per sampler, the
  fewest steps from which on every tested step count reaches it, in at least 95% of the bootstrap resamples;
- beside them, each setting's Spearman with the paper's sampler (diffusers' clipped DDIM, 100 steps) and that
  sampler's own noise floor;

into the section "## Samplers: property and agreement against steps" of benchmarks/RESULTS.md, with a figure
benchmarks/samplers.png. Run: ``nice .venv/bin/python benchmarks/bench_samplers.py`` (about 35 CPU minutes on one
thread once the models are built; building them takes about 40 more).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from machine import machine_description, package_versions, replace_section
from scipy.stats import rankdata

from diffcredit import stages
from diffcredit.contributors import ContributorData
from diffcredit.io import write_json
from diffcredit.models import unet_config_for
from diffcredit.properties import load_property
from diffcredit.sampling import generate
from diffcredit.seeds import derive_seed
from diffcredit.utility import UtilitySettings, coalition_model, record_key

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
FIGURE = Path(__file__).with_name("samplers.png")
SECTION = "Samplers: property and agreement against steps"
# A setting: (sampler, steps, generation noise). "common" is the workflow's noise, shared by every setting.
# The reference is the probability-flow ODE solved finely: DDIM without diffusers' clipping, whose per-step
# projection makes the clipped sampler's utilities depend on its step count (RESULTS.md, "Samplers: what the figures
# say"). The paper's sampler (clipped DDIM 100) is measured beside it, as a setting and as a second reference column.
REFERENCE = ("ddim-unclipped", 100, "common")
# The noise floor: the reference sampler again under another generation noise. No sampler can be told apart from
# the reference by less than the reference differs from itself across noise draws.
NOISE_FLOOR = ("ddim-unclipped", 100, "other")
PAPER = ("ddim", 100, "common")
PAPER_FLOOR = ("ddim", 100, "other")
GRID = {  # steps tried per sampler (UniPC and DPM-Solver++ agreed to the third digit in a first run: fewer points)
    "ddim-unclipped": (25, 50),
    "ddim": (25, 50, 100, 200),
    "dpmsolver++": (5, 7, 10, 15, 20, 35),
    "unipc": (5, 10, 20),
}
AGREEMENT = 0.99
COALITIONS = 28  # with ~75 CPU seconds each, about 35 minutes on one thread
RESAMPLES = 2000  # bootstrap resamples of the coalitions
CONFIDENCE = 0.95


def config() -> dict:
    """The embedded default (config/config.yaml spells out every key this benchmark reads)."""
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def stage_plan(cfg: dict) -> list[tuple[str, dict[str, str], dict]]:
    """The workflow's stages before the coalitions: (function of `diffcredit.stages`, its files in the cache, the
    settings it computes from)."""
    seed, model = cfg["seed"], cfg["model"]

    def recipe(section: str) -> dict:  # as common.smk's training_settings: each section is complete in the schema
        return {k: cfg[section][k] for k in ("steps", "batch_size", "lr", "optimizer", "ema_decay", "grad_clip")}

    data = {k: cfg["data"][k] for k in ("source", "path", "manifest", "heldout_fraction")}
    train = {"train_data": "train.npz"}
    return [
        (
            "prepare_data",
            {"train_out": "train.npz", "heldout_out": "heldout.npz", "contributors_out": "contributors.tsv"},
            {**data, "seed": seed},
        ),
        (
            "train_full",
            {**train, "out": "full", "stats_out": "full.json"},
            {"unet": model["unet"], "schedule": model["schedule"], "seed": seed, **recipe("train")},
        ),
        (
            "prune_model",
            {**train, "full_model": "full", "out": "pruned", "stats_out": "pruned.json"},
            {"schedule": model["schedule"], "seed": seed, **cfg["prune"]},
        ),
        (
            "recover",
            {**train, "pruned_model": "pruned", "out": "recovered", "stats_out": "recovered.json"},
            {"schedule": model["schedule"], "seed": seed, **recipe("recover")},
        ),
        (
            "prepare_reference",
            {**train, "heldout_data": "heldout.npz", "out": "reference"},
            {"seed": seed, **cfg["features"]},
        ),
    ]


def build_inputs(cfg: dict, cache: Path) -> tuple[Path, dict]:
    """The cache folder holding the train split, recovered model and FID reference for `cfg` (built once), and the
    seconds each stage took when it was built."""
    plan = stage_plan(cfg)
    # Keyed by what the stages compute from, not by the config's text: a config that changes none of their settings
    # reuses the models.
    key = json.dumps([[stage, settings] for stage, _, settings in plan], sort_keys=True)
    cache = cache / hashlib.sha256(key.encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    seconds_file = cache / "stage_seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    for stage, files, settings in plan:
        output = next(cache / name for argument, name in files.items() if argument.endswith("out"))
        if not output.exists():
            tic = time.perf_counter()
            getattr(stages, stage)(**{argument: str(cache / name) for argument, name in files.items()}, **settings)
            seconds[stage] = time.perf_counter() - tic
            write_json(seconds_file, seconds)
            print(f"{stage}: {seconds[stage]:.1f} s", flush=True)
    return cache, seconds


def choose_coalitions(contributors: list[str], count: int, seed: int) -> list[list[str]]:
    """`count` distinct coalitions: the grand coalition and `count` − 1 with sizes spread evenly over 1..n−1, members
    seeded; in a seeded order, so that the coalitions of a stopped run are spread over the sizes too."""
    rng = np.random.default_rng(derive_seed(seed, "bench-samplers-coalitions"))
    n = len(contributors)
    sizes = np.round(np.linspace(1, n - 1, count - 1)).astype(int)
    for size, wanted in zip(*np.unique(sizes, return_counts=True), strict=True):
        if wanted > math.comb(n, int(size)):
            raise ValueError(f"{count} coalitions need {wanted} of size {size}, but {n} contributors have fewer")
    chosen = [tuple(contributors)]
    for size in sizes:
        while (draw := tuple(sorted(rng.choice(contributors, size=int(size), replace=False).tolist()))) in chosen:
            pass
        chosen.append(draw)
    return [list(chosen[i]) for i in rng.permutation(len(chosen))]


def label(setting: tuple[str, int, str]) -> str:
    return f"{setting[0]} {setting[1]} {setting[2]} noise"


def measure(
    members: list[str], settings: list[tuple], *, store: Path, fingerprint: str, stored_only: bool = False, **context
) -> dict | None:
    """FID and CPU seconds of coalition `members` under each of `settings`; what `store` holds is not measured again
    (with `stored_only`, nothing is: None unless every setting is stored).

    `context`: data, utility (UtilitySettings), start_model, fid (the property), noise ({"common": seed, "other":
    seed}).
    """
    path = store / f"{record_key(fingerprint, members, 0)}.json"
    record = json.loads(path.read_text()) if path.exists() else {"members": members, "settings": {}}
    missing = [s for s in settings if label(s) not in record["settings"]]
    if not missing or stored_only:
        return None if missing else record
    utility = context["utility"]
    tic = time.process_time()  # CPU seconds of this one-thread process: what an idle core would take
    model, _ = coalition_model(
        members, 0, data=context["data"], settings=utility, start_model=context["start_model"], device="cpu"
    )
    record["finetune_seconds"] = time.process_time() - tic  # deterministic: a resumed coalition gets the same model
    for sampler, steps, noise in missing:
        tic = time.process_time()
        images = generate(
            model,
            utility.n_samples,
            seed=context["noise"][noise],
            inference_steps=steps,
            sampler=sampler,
            schedule=utility.schedule,
            batch_size=utility.sample_batch_size,
            device="cpu",
        )
        sample_seconds = time.process_time() - tic
        tic = time.process_time()
        value = float(context["fid"](images))
        record["settings"][label((sampler, steps, noise))] = {
            "fid": value,
            "sample_seconds": sample_seconds,
            "score_seconds": time.process_time() - tic,
        }
        write_json(path, record)  # after every setting: a stopped run loses at most one generation
    return record


def spearman_with_first(utilities: np.ndarray) -> np.ndarray:
    """Spearman of every setting with the first, over the coalitions: `utilities` [..., settings, coalitions] ->
    [..., settings]. Pearson of the average ranks, as scipy's spearmanr (ties included)."""
    ranks = rankdata(utilities, axis=-1)
    centred = ranks - ranks.mean(axis=-1, keepdims=True)
    first = centred[..., :1, :]
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one coalition repeated has no ranking
        return (centred * first).sum(-1) / np.sqrt((centred**2).sum(-1) * (first**2).sum(-1))


def analyse(records: list[dict], settings: list[tuple], seed: int) -> dict:
    """The table of the section: per setting, FID, Spearman with its bootstrap interval and reach share, seconds;
    the noise floor, the bar, and the fewest steps per sampler from which on every step count reaches the bar in
    `CONFIDENCE` of the resamples."""
    utilities = -np.array([[r["settings"][label(s)]["fid"] for r in records] for s in settings])
    point = spearman_with_first(utilities)
    paper = spearman_with_first(np.concatenate([utilities[[settings.index(PAPER)]], utilities]))[1:]
    floor_index = settings.index(NOISE_FLOOR)
    rng = np.random.default_rng(derive_seed(seed, "bench-samplers-bootstrap"))
    resamples = rng.integers(0, len(records), size=(RESAMPLES, len(records)))
    boot = spearman_with_first(np.moveaxis(utilities[:, resamples], 1, 0))  # [resamples, settings]
    bar_boot = np.minimum(AGREEMENT, boot[:, floor_index])
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.nanpercentile(boot, [tail, 100 - tail], axis=0)
    # Paired with the floor on the same resamples: both are correlations with the same reference utilities, so
    # their difference is far less uncertain than either.
    gap_low, gap_high = np.nanpercentile(boot - boot[:, floor_index : floor_index + 1], [tail, 100 - tail], axis=0)
    floor = float(point[floor_index])
    bar = min(AGREEMENT, floor)
    finetune = float(np.median([r["finetune_seconds"] for r in records]))
    rows = []
    for i, setting in enumerate(settings):
        measured = [r["settings"][label(setting)] for r in records]
        sample = float(np.median([m["sample_seconds"] for m in measured]))
        score = float(np.median([m["score_seconds"] for m in measured]))
        rows.append(
            {
                "sampler": setting[0],
                "steps": setting[1],
                "noise": setting[2],
                "fid": float(np.mean([m["fid"] for m in measured])),
                "spearman": float(point[i]),
                "spearman_paper": float(paper[i]),
                "interval": [float(low[i]), float(high[i])],
                "floor_gap": float(point[i] - floor),
                "floor_gap_interval": [float(gap_low[i]), float(gap_high[i])],
                # the bar is drawn from the same resample: the floor is uncertain too
                "reach_share": float(np.mean(boot[:, i] >= bar_boot)),
                "seconds": sample,
                "coalition_seconds": finetune + sample + score,
            }
        )
    chosen = {}
    for sampler in GRID:
        candidates = sorted(
            (r for r in rows if r["sampler"] == sampler and r["noise"] == "common"), key=lambda r: r["steps"]
        )
        # the fewest steps from which on every tested step count reaches the bar, and does so in `CONFIDENCE` of the
        # resamples (a one-sided bootstrap test): neither one lucky step count nor a lucky set of coalitions is kept
        reaching = [
            r
            for k, r in enumerate(candidates)
            if all(c["spearman"] >= bar and c["reach_share"] >= CONFIDENCE for c in candidates[k:])
        ]
        if reaching:
            chosen[sampler] = reaching[0]
    return {
        "rows": rows,
        "noise_floor": floor,
        "threshold": bar,
        "chosen": chosen,
        "best": min(chosen.values(), key=lambda r: r["coalition_seconds"]) if chosen else None,
        "finetune_seconds_median": finetune,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "results/bench_samplers")
    parser.add_argument("--n-samples", type=int, default=None, help="images per coalition (default: the config's)")
    parser.add_argument("--coalitions", type=int, default=COALITIONS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--stored", action="store_true", help="measure nothing: the planned coalitions the cache holds (a run going on)"
    )
    parser.add_argument(
        "--shard",
        default="0/1",
        help="k/K: measure only the planned coalitions numbered k mod K (K processes share the cores; a last run "
        "with --stored writes the section)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine's cores are shared; one thread is also what a coalition job gets
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()

    cfg = config()
    cache, stage_seconds = build_inputs(cfg, args.cache)
    data = ContributorData.load(cache / "train.npz")
    u = cfg["utility"]
    utility = UtilitySettings(
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
        n_samples=args.n_samples or u["n_samples"],
        sample_batch_size=u["sample_batch_size"],
        # pinned, not the package's defaults: the records are keyed by these settings' fingerprint, and the samplers
        # each record holds are labelled inside it, so a change of the default sampler must not orphan the store
        sampler=REFERENCE[0],
        inference_steps=REFERENCE[1],
    )
    settings = [REFERENCE, NOISE_FLOOR, PAPER_FLOOR] + [(s, k, "common") for s, steps in GRID.items() for k in steps]
    context = {
        "data": data,
        "utility": utility,
        "start_model": cache / "recovered",
        "fid": load_property("fid", cache / "reference"),
        "noise": {
            "common": derive_seed(cfg["seed"], "generation-noise"),
            "other": derive_seed(cfg["seed"], "bench-samplers-other-noise"),
        },
    }
    store = cache / "coalitions"
    store.mkdir(exist_ok=True)
    fingerprint = utility.fingerprint(context["start_model"])
    coalitions = choose_coalitions(sorted(set(data.contributors)), args.coalitions, cfg["seed"])
    shard, shards = map(int, args.shard.split("/"))
    records = []
    for number, members in enumerate(coalitions, 1):
        mine = (number - 1) % shards == shard
        record = measure(
            members, settings, store=store, fingerprint=fingerprint, stored_only=args.stored or not mine, **context
        )
        if record is None:
            continue
        records.append(record)
        print(
            f"coalition {number}/{len(coalitions)} ({len(members)} members): FID "
            f"{record['settings'][label(REFERENCE)]['fid']:.2f} with {label(REFERENCE)}; "
            f"{time.perf_counter() - started:.0f} s so far",
            flush=True,
        )
    if len(records) < 3:
        raise SystemExit(f"{len(records)} coalitions measured: a Spearman needs at least 3 (run without --stored)")

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "versions": package_versions(),
        "n_samples": utility.n_samples,
        "finetune_steps": utility.steps,
        "coalition_sizes": sorted(len(r["members"]) for r in records),
        "stage_seconds": stage_seconds,
        "resamples": RESAMPLES,
        "confidence": CONFIDENCE,
        **analyse(records, settings, cfg["seed"]),
        "score_seconds_median": float(np.median([m["score_seconds"] for r in records for m in r["settings"].values()])),
        "wall_seconds": time.perf_counter() - started,
        # what measuring the coalitions cost, whichever runs did it (a --stored run measures nothing)
        "cpu_seconds": float(
            sum(
                r["finetune_seconds"] + sum(m["sample_seconds"] + m["score_seconds"] for m in r["settings"].values())
                for r in records
            )
        ),
    }
    write_json(args.cache / "bench_samplers.json", report)
    print(json.dumps({k: report[k] for k in ("noise_floor", "threshold", "best", "chosen")}, indent=1))
    if not args.no_write:
        plot(report, FIGURE)
        replace_section(RESULTS, SECTION, markdown(report))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    floor = next(r for r in rows if r["noise"] == "other")
    shifts = np.linspace(0.95, 1.05, len(GRID))  # samplers shifted apart so that their bars do not overlap
    for shift, sampler in zip(shifts, GRID, strict=True):
        line = sorted(
            (r for r in rows if r["sampler"] == sampler and r["noise"] == "common" and r is not rows[0]),
            key=lambda r: r["steps"],
        )
        steps = np.array([r["steps"] for r in line])
        left.plot(steps, [r["fid"] for r in line], "o-", label=sampler)
        rho = np.array([r["spearman"] for r in line])
        bounds = np.array([r["interval"] for r in line]).T
        right.errorbar(steps * shift, rho, yerr=[rho - bounds[0], bounds[1] - rho], fmt="o-", capsize=3, label=sampler)
    left.axhline(rows[0]["fid"], color="black", linestyle="--", label="unclipped DDIM 100")
    left.set(
        xscale="log", xlabel="inference steps", ylabel="FID (mean over coalitions)", title="property against steps"
    )
    left.legend()
    right.axhline(AGREEMENT, color="gray", linestyle=":", label="0.99")
    right.axhline(floor["spearman"], color="black", linestyle="--", label="unclipped DDIM 100, other noise")
    right.axhspan(*floor["interval"], color="black", alpha=0.08)
    right.set(
        xscale="log",
        xlabel="inference steps",
        ylabel="Spearman with unclipped DDIM 100",
        title=f"agreement of coalition utilities ({report['confidence']:.0%} bootstrap intervals)",
        ylim=(max(0.0, min(r["interval"][0] for r in rows) - 0.02), 1.005),
    )
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    rows = report["rows"]
    reference = rows[0]
    lines = [
        f"Command: `nice .venv/bin/python benchmarks/bench_samplers.py`. Machine: {report['machine']}. "
        f"Date: {report['date']}. Measuring the coalitions took {report['cpu_seconds']:.0f} CPU s of one thread "
        f"(building the models and the reference, once, {sum(report['stage_seconds'].values()):.0f} s more). Packages: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        "",
        f"The embedded default (config/config.yaml) built by the workflow's stages; {len(report['coalition_sizes'])} "
        f"distinct coalitions of sizes {', '.join(map(str, report['coalition_sizes']))} fine-tuned once each (sft, "
        f"k = {report['finetune_steps']} steps, median {report['finetune_seconds_median']:.1f} CPU s), then sampled "
        f"{report['n_samples']} images with every setting from the same generation noise; FID with the workflow's "
        f"classifier features against the held-out digits (median {report['score_seconds_median']:.2f} s). Spearman: "
        "coalition utilities (−FID) against unclipped DDIM at 100 steps (the reference), with a percentile bootstrap interval "
        f"({report['confidence']:.0%}, {report['resamples']} resamples of the coalitions). Reach: the share of "
        "resamples in which the setting's Spearman is at least the bar min(0.99, noise floor) of the same resample. "
        "Gap to the floor: the setting's Spearman minus the floor's, with its interval from the same resamples "
        "(paired: both correlate with the same reference utilities). "
        "Seconds: median CPU seconds of one thread, for the generation and for the whole coalition (fine-tune, "
        "generation, FID).",
        "",
        "| sampler | steps | noise | FID (mean) | Spearman vs reference | interval | gap to the floor (interval) | "
        "reach | Spearman vs paper's DDIM 100 | generation CPU s | coalition CPU s |",
        "| --- | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        trivial = r is reference or r["noise"] == "other"
        reach = "—" if trivial else f"{r['reach_share']:.2f}"
        gap = (
            "—"
            if trivial
            else f"{r['floor_gap']:+.3f} ({r['floor_gap_interval'][0]:+.3f} to {r['floor_gap_interval'][1]:+.3f})"
        )
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['noise']} | {r['fid']:.2f} | {r['spearman']:.3f} | "
            f"{r['interval'][0]:.3f}–{r['interval'][1]:.3f} | {gap} | {reach} | {r['spearman_paper']:.3f} | "
            f"{r['seconds']:.2f} | "
            f"{r['coalition_seconds']:.2f} |"
        )
    floor = rows[1]
    paper_floor = rows[2]
    lines += [
        "",
        f"Noise floor: unclipped DDIM 100 under another generation noise agrees with itself at Spearman "
        f"{report['noise_floor']:.3f} ({floor['interval'][0]:.3f}–{floor['interval'][1]:.3f}); the bar is "
        f"min(0.99, that) = {report['threshold']:.3f}. The paper's clipped DDIM 100 under the other noise agrees with "
        f"itself at {paper_floor['spearman_paper']:.3f}.",
        f"Fewest steps from which on every tested step count reaches it, in at least {report['confidence']:.0%} "
        "of the resamples, per sampler: "
        + (", ".join(f"{s} {r['steps']}" for s, r in report["chosen"].items()) or "none")
        + ".",
    ]
    best = report["best"]
    if best and best["sampler"] == reference["sampler"] and best["steps"] == reference["steps"]:
        lines.append("Only the reference itself reaches it. Figure: `benchmarks/samplers.png`.")
    elif best:
        lines.append(
            f"Cheapest of those: **{best['sampler']}, {best['steps']} steps**, "
            f"{reference['seconds'] / best['seconds']:.1f}× less generation time than the reference and "
            f"{reference['coalition_seconds'] / best['coalition_seconds']:.1f}× less per coalition, at Spearman "
            f"{best['spearman']:.3f}. Figure: `benchmarks/samplers.png`."
        )
    if best:
        finest = max((r for r in rows if r["sampler"] == PAPER[0] and r["noise"] == "common"), key=lambda r: r["steps"])
        lines.append(
            f"Against the paper's sampler (clipped DDIM 100) it agrees at {best['spearman_paper']:.3f}, below that "
            f"sampler's own floor ({paper_floor['spearman_paper']:.3f}); the paper's sampler with {finest['steps']} "
            f"steps agrees with it at {finest['spearman_paper']:.3f}."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
