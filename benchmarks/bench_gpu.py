"""Seconds per coalition at the cifar20 preset's model size (synthetic data): the paper's recipe against DiffCredit's.

Per coalition, sparsified fine-tuning (k steps of the pruned model), generation and FID scoring, with

- the anchor, the paper's recipe: fp32 with PyTorch's default TF32 flags, DDIM with 100 steps, 256 images a batch,
  one coalition at a time;
- DiffCredit's default for the preset (config/presets/cifar20.yaml): its sampler and steps, its precision (bf16
  autocast) and its generation batch size, TF32 on;

and the throughput of several coalitions trained and sampled together (``--together K``), as K sequential models, K
models on K CUDA streams, or one stacked model vectorised over coalitions with ``torch.func`` (vmap of
functional_call), so that the fastest is chosen by measurement. The scorer is an Inception-v3-sized network with
random weights (the real extractor is a local file that this benchmark need not have; its cost is the same).

The per-coalition figures are rates measured on a share of the work (``--finetune-steps``, ``--sample-batches``)
times the preset's counts (k fine-tuning steps, n_samples images); ``--full`` measures the whole of it instead.
Writes the section "## GPU path: seconds per coalition at the cifar20 size" of benchmarks/RESULTS.md (not with
``--tiny``) and a JSON with every figure (``--json``).

    .venv/bin/python benchmarks/bench_gpu.py --tiny            # CPU, seconds: checks the script (tests do this)
    python benchmarks/bench_gpu.py --json bench_gpu.json       # a CUDA machine, ~5 minutes on an H200

On a GPU machine without internet, carry the wheels: ``pip download diffusers==0.42.1 torch-pruning==1.6.1
clean-fid==0.1.35 -d wheels/`` here, then there ``pip install --no-index --find-links wheels/ wheels/*.whl`` and
``pip install --no-deps -e .`` (torch and torchvision from the machine's own CUDA build).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from diffcredit import sampling, training
from diffcredit.models import build_model, count_parameters, tiny_unet_config, unet_config_for
from diffcredit.properties.features import extract_features
from diffcredit.properties.fid import FID, feature_stats
from diffcredit.pruning import prune

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "config/presets/cifar20.yaml"
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "GPU path: seconds per coalition at the cifar20 size"
ANCHOR = {"sampler": "ddim", "inference_steps": 100, "precision": "fp32", "sample_batch_size": 256}


def preset() -> dict:
    """The preset's recipe over the schema defaults it relies on."""
    cfg = yaml.safe_load(PRESET.read_text())
    u, m = cfg["utility"], cfg["model"]
    return {
        "unet": m["unet"],
        "ratio": cfg["prune"]["ratio"],
        "finetune_steps": u["finetune_steps"],
        "batch_size": u["batch_size"],
        "lr": u["lr"],
        "n_samples": u["n_samples"],
        "default": {
            "sampler": u["sampler"],
            "inference_steps": u["inference_steps"],
            "precision": m.get("precision", "fp32"),
            "sample_batch_size": u.get("sample_batch_size", 256),
        },
    }


class InceptionSized(nn.Module):
    """Inception-v3's trunk (random weights, 2048 features) behind the 299×299 resize clean-fid applies."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.net.fc = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False))


class TinyExtractor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


@contextlib.contextmanager
def pytorch_default_tf32():
    """The anchor's arithmetic: PyTorch's defaults (TF32 for convolutions, not for matmuls), not DiffCredit's."""
    original = training.prepare_device

    def defaults(device: torch.device) -> None:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = True

    training.prepare_device = sampling.prepare_device = defaults
    try:
        yield
    finally:
        training.prepare_device = sampling.prepare_device = original


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function, /, *args, **kwargs) -> tuple[object, float]:
    synchronize(device)
    tic = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize(device)
    return result, time.perf_counter() - tic


def per_coalition(
    recipe: dict, *, model: nn.Module, data: np.ndarray, score: FID, spec: dict, args, device: torch.device
) -> dict:
    """Seconds of one coalition's fine-tune, generation and scoring under `recipe` (rates × the preset's counts)."""
    steps = spec["finetune_steps"] if args.full else min(args.finetune_steps, spec["finetune_steps"])
    fit = {
        "batch_size": spec["batch_size"],
        "lr": spec["lr"],
        "seed": 0,
        "device": str(device),
        "precision": recipe["precision"],
        "log_every": 0,
    }
    training.reset_peak_memory(device)
    work = copy.deepcopy(model)
    training.train(work, data, steps=2, **fit)  # warm-up: cuDNN autotuning, allocator
    _, seconds = timed(device, training.train, work, data, steps=steps, **fit)
    finetune = seconds / steps * spec["finetune_steps"]

    batch = recipe["sample_batch_size"]
    batches = math.ceil(spec["n_samples"] / batch)
    measured = batches if args.full else min(args.sample_batches, batches)
    n = min(spec["n_samples"], measured * batch)
    gen = {
        "seed": 1,
        "sampler": recipe["sampler"],
        "batch_size": batch,
        "device": str(device),
        "precision": recipe["precision"],
    }
    sampling.generate(work, min(batch, 8), inference_steps=2, **gen)  # warm-up
    images, seconds = timed(device, sampling.generate, work, n, inference_steps=recipe["inference_steps"], **gen)
    sample = seconds / n * spec["n_samples"]

    _, seconds = timed(device, score, images)
    scoring = seconds / len(images) * spec["n_samples"]
    return {
        "finetune": finetune,
        "sample": sample,
        "score": scoring,
        "total": finetune + sample + scoring,
        "peak_memory": training.peak_memory(device),
        "measured_finetune_steps": steps,
        "measured_samples": n,
    }


def together(
    model: nn.Module, data: np.ndarray, *, k: int, spec: dict, recipe: dict, args, device: torch.device
) -> dict:
    """Fine-tuning steps and denoising evaluations per second for `k` coalitions at once, by each way of running
    them together (``sequential`` is one model after the other: the baseline)."""
    models = [copy.deepcopy(model).to(device) for _ in range(k)]
    batch = min(recipe["sample_batch_size"], spec["n_samples"])
    steps = args.together_steps
    clean = torch.from_numpy(np.resize(data, (k, spec["batch_size"], *data.shape[1:]))).to(device)
    noise_sample = torch.randn(k, batch, *data.shape[1:], device=device)
    t_train = torch.randint(0, 1000, (k, spec["batch_size"]), device=device)
    context = training.autocast(device, recipe["precision"])
    training.prepare_device(device)
    out: dict[str, dict] = {}

    def fit_step(m, opt, x, t):
        with context:
            loss = F.mse_loss(m(x, t).sample.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    def denoise(m, x, t):
        with torch.inference_mode(), context:
            return m(x, t).sample

    optimizers = [torch.optim.Adam(m.parameters(), lr=spec["lr"]) for m in models]
    streams = [torch.cuda.Stream(device) for _ in models] if device.type == "cuda" else None
    for way in ["sequential"] + (["streams"] if streams else []):

        def run_fit(way=way):
            for _ in range(steps):
                for i, (m, opt) in enumerate(zip(models, optimizers, strict=True)):
                    with torch.cuda.stream(streams[i]) if way == "streams" else contextlib.nullcontext():
                        fit_step(m, opt, clean[i], t_train[i])

        def run_sample(way=way):
            for _ in range(steps):
                for i, m in enumerate(models):
                    with torch.cuda.stream(streams[i]) if way == "streams" else contextlib.nullcontext():
                        denoise(m, noise_sample[i], torch.tensor(500, device=device))

        for m in models:
            m.train()
        fit_step(models[0], optimizers[0], clean[0], t_train[0])  # warm-up
        _, fit_seconds = timed(device, run_fit)
        for m in models:
            m.eval()
        _, sample_seconds = timed(device, run_sample)
        out[way] = {
            "finetune_steps_per_s": k * steps / fit_seconds,
            "images_evaluated_per_s": k * steps * batch / sample_seconds,
        }
    try:
        out["vmap"] = vectorised(
            models, clean, t_train, noise_sample, steps=steps, lr=spec["lr"], context=context, device=device
        )
    except Exception as error:  # a model or kernel that torch.func cannot batch: record it, keep the others
        out["vmap"] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    base = out["sequential"]
    for figures in out.values():
        if "error" not in figures:
            figures["finetune_gain"] = figures["finetune_steps_per_s"] / base["finetune_steps_per_s"]
            figures["sample_gain"] = figures["images_evaluated_per_s"] / base["images_evaluated_per_s"]
    return out


def vectorised(models, clean, t_train, noise_sample, *, steps, lr, context, device) -> dict:
    """The k models as one: stacked parameters, vmap over the coalition axis of functional_call (grad for training;
    Adam is elementwise, so one Adam over the stacked tensors is k independent Adams; clipping is per model)."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, t):
        with context:
            return F.mse_loss(functional_call(base, (p, b), (x, t)).sample.float(), x)

    def forward(p, b, x, t):
        with context:
            return functional_call(base, (p, b), (x, t)).sample

    opt = torch.optim.Adam(list(params.values()), lr=lr)
    per_model_grad = vmap(grad(loss), randomness="different")

    def fit_step():
        grads = per_model_grad(params, buffers, clean, t_train)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
        scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        for name, p in params.items():
            p.grad = grads[name] * scale.view(-1, *[1] * (p.dim() - 1))
        opt.step()

    base.train()
    fit_step()  # warm-up
    _, fit_seconds = timed(device, lambda: [fit_step() for _ in range(steps)])
    base.eval()
    batched_forward = vmap(forward, in_dims=(0, 0, 0, None))
    t = torch.tensor(500, device=device)
    with torch.inference_mode():
        _, sample_seconds = timed(
            device, lambda: [batched_forward(params, buffers, noise_sample, t) for _ in range(steps)]
        )
    k, batch = noise_sample.shape[:2]
    return {
        "finetune_steps_per_s": k * steps / fit_seconds,
        "images_evaluated_per_s": k * steps * batch / sample_seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and counts on the CPU: checks the script")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full", action="store_true", help="measure the preset's whole counts, not rates")
    parser.add_argument("--finetune-steps", type=int, default=50, help="fine-tuning steps measured per recipe")
    parser.add_argument("--sample-batches", type=int, default=2, help="generation batches measured per recipe")
    parser.add_argument("--together", type=int, default=4, help="coalitions run together for the throughput")
    parser.add_argument("--together-steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args(argv)
    device = training.select_device(args.device)
    spec = preset()
    if args.tiny:
        torch.set_num_threads(1)
        spec.update(
            unet={**tiny_unet_config(channels=3), "dropout": spec["unet"].get("dropout", 0.0)},  # the tests' UNet
            finetune_steps=20,
            batch_size=8,
            n_samples=32,
            default={
                **spec["default"],
                "inference_steps": min(spec["default"]["inference_steps"], 5),
                "sample_batch_size": 16,
            },
        )
        args.finetune_steps, args.sample_batches, args.together, args.together_steps = 3, 1, 2, 2
        recipes = {"anchor": {**ANCHOR, "inference_steps": 5, "sample_batch_size": 8}, "diffcredit": spec["default"]}
    else:
        recipes = {"anchor": ANCHOR, "diffcredit": spec["default"]}
    size = spec["unet"].get("sample_size", 32)
    started = time.perf_counter()
    full = build_model(unet_config_for((1, 3, size, size), spec["unet"]), seed=0)
    model = prune(full, spec["ratio"])
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 1, (max(4 * spec["batch_size"], 64), 3, size, size)).astype(np.float32)
    extractor = (TinyExtractor() if args.tiny else InceptionSized()).to(device).eval()
    reference = rng.uniform(-1, 1, (64 if args.tiny else 2048 + 64, 3, size, size)).astype(np.float32)
    score = FID(extractor, *feature_stats(extract_features(extractor, reference)))

    report = {
        "date": datetime.date.today().isoformat(),
        "device": describe(device),
        "tiny": args.tiny,
        "parameters": {"full": count_parameters(full), "pruned": count_parameters(model)},
        "spec": {k: v for k, v in spec.items() if k != "unet"},
        "recipes": recipes,
        "per_coalition": {},
    }
    for name, recipe in recipes.items():
        with pytorch_default_tf32() if name == "anchor" else contextlib.nullcontext():
            report["per_coalition"][name] = per_coalition(
                recipe, model=model, data=data, score=score, spec=spec, args=args, device=device
            )
        print(name, json.dumps(report["per_coalition"][name]), flush=True)
    anchor, ours = report["per_coalition"]["anchor"], report["per_coalition"]["diffcredit"]
    report["speedup"] = anchor["total"] / ours["total"]
    report["together_k"] = args.together
    report["together"] = together(
        model, data, k=args.together, spec=spec, recipe=recipes["diffcredit"], args=args, device=device
    )
    report["wall_seconds"] = time.perf_counter() - started
    print(json.dumps({k: report[k] for k in ("speedup", "together", "wall_seconds")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if not (args.tiny or args.no_write):
        from machine import package_versions, replace_section

        report["versions"] = package_versions()
        replace_section(RESULTS, SECTION, markdown(report))
    return report


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}"
        )
    from machine import machine_description

    return f"CPU: {machine_description()}, {torch.get_num_threads()} torch threads"


def markdown(report: dict) -> str:
    spec = report["spec"]
    rows = [
        "| recipe | sampler, steps | precision | generation batch | fine-tune (s) | sample (s) | score (s) | "
        "total (s) | peak memory (GiB) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, recipe in report["recipes"].items():
        r = report["per_coalition"][name]
        memory = f"{r['peak_memory'] / 2**30:.1f}" if r["peak_memory"] else "–"
        rows.append(
            f"| {name} | {recipe['sampler']}, {recipe['inference_steps']} | {recipe['precision']} | "
            f"{recipe['sample_batch_size']} | {r['finetune']:.1f} | {r['sample']:.1f} | {r['score']:.1f} | "
            f"{r['total']:.1f} | {memory} |"
        )
    together_rows = [
        "| way | fine-tune steps/s | gain | images evaluated/s | gain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for way, f in report["together"].items():
        if "error" in f:
            together_rows.append(f"| {way} | failed: {f['error']} | | | |")
        else:
            together_rows.append(
                f"| {way} | {f['finetune_steps_per_s']:.2f} | {f['finetune_gain']:.2f}× | "
                f"{f['images_evaluated_per_s']:.0f} | {f['sample_gain']:.2f}× |"
            )
    return "\n".join(
        [
            f"Command: `python benchmarks/bench_gpu.py`. Device: {report['device']}. Date: {report['date']}. "
            f"Wall time: {report['wall_seconds']:.0f} s. Packages: "
            + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
            + ".",
            "",
            f"The cifar20 preset's UNet ({report['parameters']['full'] / 1e6:.1f}M parameters, pruned to "
            f"{report['parameters']['pruned'] / 1e6:.1f}M), synthetic 32×32 data; per coalition {spec['finetune_steps']} "
            f"fine-tuning steps at batch {spec['batch_size']} and {spec['n_samples']} images scored by FID with an "
            "Inception-v3-sized extractor; seconds are measured rates times these counts.",
            "",
            *rows,
            "",
            f"DiffCredit's default costs **{report['speedup']:.1f}× less** per coalition than the paper's recipe.",
            "",
            f"{report['together_k']} coalitions at once (rates summed over the coalitions; gain against one after the "
            "other; DiffCredit's default recipe):",
            "",
            *together_rows,
        ]
    )


if __name__ == "__main__":
    main()
