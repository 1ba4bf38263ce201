"""Feature extractors behind the properties: a small digit classifier trained here, or a local TorchScript or
torch.export module.

Inception weights would have to be downloaded and are meaningless on 8x8 digits, so FID and its relatives embed
images with a classifier the workflow trains itself (seeded, seconds on a CPU). Its features are a 64-d (or smaller)
linear layer, standardised and taken before the nonlinearity, so that no unit is dead and the feature covariance
stays full-rank. Larger images (faces, art) come with their own extractor as a local TorchScript or torch.export
file that maps images in [-1, 1] to features.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffcredit.io import write_atomic


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild a `DigitClassifier` (stored as JSON beside its weights)."""

    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    feature_dim: int = 64
    width: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.feature_dim <= 64:
            raise ValueError(
                f"feature_dim={self.feature_dim}: use 1..64 features so their covariance stays well estimated"
            )
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: a classifier needs at least 2 classes")


class DigitClassifier(nn.Module):
    """A small CNN for 8x8 gray (or small RGB) images; `features` is its penultimate layer."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.trunk = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),  # any image size down to 2x2 cells
            nn.Flatten(),
            nn.Linear(8 * w, config.feature_dim),
            nn.BatchNorm1d(config.feature_dim, affine=False),  # unit-scale features keep KID's cubic kernel tame
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(config.feature_dim, config.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, feature_dim] of images [B, C, H, W] in [-1, 1]."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.trunk(x))


def check_images(images: np.ndarray, *, channels: int | None = None, size: int | None = None) -> np.ndarray:
    """Return `images` as float32 [N, C, H, W] in [-1, 1], or raise ValueError saying what is wrong and how to fix it."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"images have shape {images.shape}: expected [N, C, H, W] (add a channel axis for gray images)"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty: generate at least one image")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"images have {images.shape[1]} channels (shape {images.shape}); the extractor expects {channels}"
        )
    if size is not None and images.shape[2:] != (size, size):
        raise ValueError(f"images are {images.shape[2]}x{images.shape[3]}; the extractor expects {size}x{size}")
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{len(bad)} image(s) contain NaN or inf (first: index {bad[0]}); check the sampler")
    low, high = float(images.min()), float(images.max())
    if low < -1.001 or high > 1.001:  # a little slack for float round-off in samplers
        raise ValueError(f"image values span [{low:.3g}, {high:.3g}]: scale them to [-1, 1] (e.g. x / 127.5 - 1)")
    return images.astype(np.float32, copy=False)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    feature_dim: int = 64,
) -> DigitClassifier:
    """Train a `DigitClassifier` on labelled images with Adam; the same seed gives the same weights.

    Labels are integers 0..K-1; K is the largest label + 1. The global torch RNG is left untouched.
    """
    images = check_images(images)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels have shape {labels.shape}: expected one label per image, ({len(images)},)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"labels must be non-negative integers (class indices), got dtype {labels.dtype}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"images are {images.shape[2]}x{images.shape[3]}: the classifier needs square images")
    config = ClassifierConfig(
        in_channels=images.shape[1],
        image_size=images.shape[2],
        num_classes=int(labels.max()) + 1,
        feature_dim=feature_dim,
    )
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    batches = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial weights and dropout masks
        model = DigitClassifier(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=batches)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | Path) -> None:
    """Write weights to `path` (.safetensors) and the config to the same name with .json, each atomically."""
    path = Path(path)
    write_atomic(path, lambda tmp: save_file(model.state_dict(), tmp))
    write_atomic(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(asdict(model.config))))


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    """Rebuild a classifier saved by `save_classifier`, in eval mode."""
    path = Path(path)
    config = ClassifierConfig(**json.loads(path.with_suffix(".json").read_text()))
    model = DigitClassifier(config)
    model.load_state_dict(load_file(path, device="cpu"))
    return model.to(device).eval()


def load_module(path: str | Path, device: str | torch.device = "cpu", *, role: str = "feature extractor") -> nn.Module:
    """Load a local TorchScript (torch.jit.save) or, for a .pt2 file, torch.export (torch.export.save) module.

    A feature extractor maps images [B, C, H, W] in [-1, 1] to features [B, d]. Nothing is ever downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{role} {str(path)!r} not found: pass a local TorchScript (.pt) or torch.export (.pt2) file"
        )
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module().to(device)  # exported in inference mode; .eval() is refused
    return torch.jit.load(str(path), map_location=device).eval()


def extract_features(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Features [N, d] (float64) of images [N, C, H, W]: `model.features` of a classifier, else `model(x)`."""
    embed = model.features if isinstance(model, DigitClassifier) else model
    feats = _batched(embed, images, batch_size, model)
    if feats.ndim != 2:
        raise ValueError(f"the extractor returned shape {feats.shape}: it must map images to features [N, d]")
    return feats


def predict_log_probs(model: DigitClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Log class probabilities [N, num_classes] (float64) of images under the classifier."""
    return _batched(lambda x: torch.log_softmax(model(x), dim=1), images, batch_size, model)


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for a module without any)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int, model: nn.Module
) -> np.ndarray:
    config = getattr(model, "config", None)
    if isinstance(config, ClassifierConfig):
        images = check_images(images, channels=config.in_channels, size=config.image_size)
    else:
        images = check_images(images)
    device = module_device(model)
    with torch.no_grad():
        out = [fn(torch.from_numpy(images[i : i + batch_size]).to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().cpu().numpy()
