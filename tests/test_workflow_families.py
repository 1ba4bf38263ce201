"""The latent and text-LoRA families through the workflow: every family preset plans, and each stand-in runs end to end.

The GPU presets read staged weights and images (resources/README.md); planning needs only their manifests (the
contributors), so the dry-runs stage fake manifests and nothing else. The glyph presets render their data themselves
(``data.source: glyphs``); the tiny runs read smaller glyphs that ``python -m diffcredit.glyphs`` writes to an npz.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from workflow_files import planned_jobs, snakemake, workflow_copy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"


def stage_manifest(workdir: Path, folder: str, contributors: int, prefix: str) -> None:
    lines = ["path\tcontributor"] + [
        f"{prefix}{i:03d}/{j}.png\t{prefix}{i:03d}" for i in range(contributors) for j in range(2)
    ]
    (workdir / "resources" / folder).mkdir(parents=True)
    (workdir / "resources" / folder / "manifest.tsv").write_text("\n".join(lines) + "\n")


def stage_glyphs(workdir: Path, path: str, *args: str) -> None:
    from diffcredit.glyphs import main

    main([str(workdir / path), *args])


@pytest.mark.parametrize(
    ("preset", "contributors"),
    [("cifar20", 20), ("celebahq-ldm", 50), ("artbench-lora", 258), ("latent-glyphs", 12), ("glyphs-lora", 12)],
)
def test_family_presets_plan_every_job_with_only_their_contributors_staged(tmp_path, preset, contributors):
    workdir = workflow_copy(tmp_path)
    (workdir / "resources").mkdir(exist_ok=True)
    staged = {
        "cifar20": ("cifar20", "class"),
        "celebahq-ldm": ("celebahq", "identity"),
        "artbench-lora": ("artbench", "artist"),
    }
    if preset in staged:
        stage_manifest(workdir, staged[preset][0], contributors, staged[preset][1])
    jobs = planned_jobs(
        snakemake(workdir, "-n", "--configfile", "config/config.yaml", f"config/presets/{preset}.yaml").stdout
    )
    assert jobs.get("prepare_family", 0) == (preset != "cifar20")  # the pixel family has nothing to prepare
    assert jobs["train_full"] == jobs["prune"] == jobs["recover"] == 1
    assert jobs["coalition_utilities"] >= 2


def test_the_pixel_family_has_no_preparation_job(tmp_path):
    jobs = planned_jobs(snakemake(workflow_copy(tmp_path), "-n", "--configfile", str(CONFIGS / "tiny.yaml")).stdout)
    assert "prepare_family" not in jobs and jobs["train_full"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("family", ["latent", "text-lora"])
def test_each_family_stand_in_runs_end_to_end_with_efficient_values(tmp_path, family):
    workdir = workflow_copy(tmp_path)
    stage_glyphs(workdir, "glyphs8.npz", "--size", "8", "--variants", "1")
    snakemake(workdir, "--cores", "2", "--configfile", str(CONFIGS / f"tiny-{family}.yaml"), timeout=900)
    run = workdir / "results" / f"tiny-{family}"
    values = pd.read_csv(run / "sft" / "kernelshap" / "values.csv")
    utilities = pd.read_csv(run / "sft" / "kernelshap" / "utilities.tsv", sep="\t")
    plan = pd.read_csv(run / "plans" / "kernelshap.tsv", sep="\t", keep_default_na=False)
    assert (
        len(values) == 12 and values["ci_low"].le(values["value"]).all() and values["value"].le(values["ci_high"]).all()
    )
    size = plan.set_index("coalition")["members"].map(lambda m: len([x for x in m.split(",") if x]))
    # v(∅) of a LoRA is its base, the same for every seed: measured once, N three times (the latent ∅ varies)
    repeats = plan.set_index("coalition")["repeats"].groupby(size).max()
    assert (repeats[0], repeats[12]) == ((1, 3) if family == "text-lora" else (2, 2))
    assert utilities["coalition"].map(size).value_counts()[[0, 12]].tolist() == [repeats[0], repeats[12]]
    by_size = utilities.groupby(utilities["coalition"].map(size))["utility"].mean()
    assert values["value"].sum() == pytest.approx(by_size[12] - by_size[0], rel=1e-6)
    summary = json.loads((run / "family" / "family.json").read_text())
    pruned = json.loads((run / "models" / "pruned.json").read_text())
    assert pruned["parameters_after"] < pruned["parameters_before"]
    if family == "latent":
        assert summary["scaling_factor"] > 0 and summary["latent_shape"] == [2, 4, 4]
    else:
        assert pruned["parameters_after"] <= 0.5 * pruned["parameters_before"]  # prune.ratio: the LoRA share kept
        assert (run / "models" / "recovered" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "figures" / "samples.png").is_file()
    # the baselines that read the full model's gradients and generations, replay its training, and retrain members
    # from scratch, through the family
    methods = ("dtrak", "pixel_similarity_max", "inrun", "ensembles", "ensembles_contrast")
    baselines = [f"results/tiny-{family}/baselines/{method}/values.csv" for method in methods]
    snakemake(workdir, "--cores", "2", *baselines, "--configfile", str(CONFIGS / f"tiny-{family}.yaml"), timeout=300)
    for path in baselines:
        scores = pd.read_csv(workdir / path)
        assert len(scores) == 12 and scores["value"].notna().all() and scores["value"].nunique() > 1


def test_evaluate_plans_every_baseline_in_a_family(tmp_path):
    workdir = workflow_copy(tmp_path)
    stage_glyphs(workdir, "glyphs8.npz", "--size", "8", "--variants", "1")
    config = ("--configfile", str(CONFIGS / "tiny-latent.yaml"))
    chosen = ("--config", "evaluation={baselines: [dtrak, ensembles, pixel_similarity_mean, add_one_in, inrun]}")
    jobs = planned_jobs(snakemake(workdir, "-n", "evaluate", *config, *chosen).stdout)
    assert jobs["baseline_add_one_in"] == 1 and jobs["trak_features"] == 1 and jobs["baseline_similarity"] == 1
    assert jobs["baseline_inrun"] == 1 and jobs["ensemble_member"] == 6 and jobs["baseline_ensembles"] == 1
    jobs = planned_jobs(snakemake(workdir, "-n", "baselines", *config).stdout)
    assert jobs["trak_features"] == 2 and jobs["baseline_trak"] == 6 and jobs["baseline_inrun"] == 1
    assert jobs["ensemble_member"] == 6


def test_replacing_staged_files_reruns_the_stages_that_read_them(tmp_path):
    from diffcredit.families import text_conditioning as tc
    from diffcredit.glyphs import LETTERS, caption

    workdir = workflow_copy(tmp_path)
    stage_glyphs(workdir, "glyphs8.npz", "--size", "8", "--variants", "1")
    staged = workdir / "resources" / "base"
    tc.save_base(tc.tiny_base([caption(letter) for letter in LETTERS], sample_size=8, seed=0), staged)
    (workdir / "staged.yaml").write_text("model:\n  text_lora:\n    base: resources/base\n")
    configs = ("--configfile", str(CONFIGS / "tiny-text-lora.yaml"), "staged.yaml")
    snakemake(workdir, "--cores", "1", "results/tiny-text-lora/family", *configs)
    assert planned_jobs(snakemake(workdir, "-n", "results/tiny-text-lora/family", *configs).stdout) == {}
    tc.save_base(tc.tiny_base([caption(letter) for letter in LETTERS], sample_size=8, seed=1), staged)  # replaced
    jobs = planned_jobs(snakemake(workdir, "-n", "--cores", "1", *configs).stdout)
    assert jobs["prepare_family"] == jobs["train_full"] == jobs["recover"] == 1 and "prepare_data" not in jobs
    stage_glyphs(workdir, "glyphs8.npz", "--size", "8", "--variants", "2")  # other items
    assert planned_jobs(snakemake(workdir, "-n", "--cores", "1", *configs).stdout)["prepare_data"] == 1
