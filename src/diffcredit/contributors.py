"""Contributors: who owns which training item, and the ids that name them.

Ids become path parts and TSV cells, so they are checked once, here, for everyone. A :class:`ContributorData` is a
dataset in which every item belongs to exactly one contributor (a player of the Shapley game). This module imports only
numpy at import time: the CLI imports it and must start fast, so pandas, PIL and scikit-learn load inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

CONTRIBUTOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

SOURCES = ("digits", "folder", "npz", "marketplace", "glyphs")


def validate_contributor_id(value: object, where: str = "") -> str:
    """Return ``value`` as a contributor id, or raise ValueError naming it and the rule it breaks."""
    text = "" if value is None else str(value)
    if not CONTRIBUTOR_ID.fullmatch(text) or ".." in text:
        place = f" ({where})" if where else ""
        raise ValueError(
            f"invalid contributor id {text!r}{place}: ids must match [A-Za-z0-9][A-Za-z0-9_.-]* "
            "and may not contain '..' (no slashes, spaces or other characters); rename the contributor"
        )
    return text


@dataclass(frozen=True, eq=False)
class ContributorData:
    """Training images with one contributor per item.

    Attributes:
        images: float32 ``[N, C, H, W]`` scaled to ``[-1, 1]``.
        contributors: str ``[N]``, the contributor id of each item.
        item_ids: str ``[N]``, unique item ids.
        labels: int ``[N]`` class labels when the source has them, else None.
    """

    images: np.ndarray
    contributors: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.ndim != 4 or images.dtype != np.float32:
            raise ValueError(f"images must be float32 [N, C, H, W], got {images.dtype} {images.shape}")
        n = len(images)
        # Unicode arrays (not object arrays) so that .npz files load with allow_pickle=False.
        contributors = np.asarray(self.contributors, dtype=str).reshape(-1)
        item_ids = np.asarray(self.item_ids, dtype=str).reshape(-1)
        for name, column in (("contributors", contributors), ("item_ids", item_ids)):
            if len(column) != n:
                raise ValueError(f"{name} has {len(column)} entries but there are {n} images")
        unique_ids, counts = np.unique(item_ids, return_counts=True)
        if (counts > 1).any():
            duplicate = str(unique_ids[counts > 1][0])
            raise ValueError(f"item id {duplicate!r} occurs {counts[counts > 1][0]} times; item ids must be unique")
        for cid, index in zip(*np.unique(contributors, return_index=True), strict=True):
            validate_contributor_id(cid, where=f"item {str(item_ids[index])!r}")
        labels = None if self.labels is None else np.asarray(self.labels)
        if labels is not None and (labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "contributors", contributors)
        object.__setattr__(self, "item_ids", item_ids)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def contributor_ids(self) -> list[str]:
        """Contributor ids in order of first appearance."""
        ids, first = np.unique(self.contributors, return_index=True)
        return [str(cid) for cid in ids[np.argsort(first)]]

    def subset(self, members: Iterable[str]) -> ContributorData:
        """The items of the given contributors (a coalition), in their original order."""
        members = [str(m) for m in members]
        known = set(self.contributor_ids)
        unknown = [m for m in members if m not in known]
        if unknown:
            raise ValueError(
                f"unknown contributor {unknown[0]!r}; the data has {len(known)} contributors: "
                f"{', '.join(sorted(known)[:10])}{' ...' if len(known) > 10 else ''}"
            )
        return self._take(np.isin(self.contributors, members))

    def digest(self) -> str:
        """SHA-256 of the items: their ids, contributors and float32 pixels, in order."""
        digest = hashlib.sha256(json.dumps([self.item_ids.tolist(), self.contributors.tolist()]).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return digest.hexdigest()

    def counts(self) -> pd.Series:
        """Items per contributor, in :attr:`contributor_ids` order."""
        import pandas as pd

        counts = pd.Series(self.contributors).value_counts()
        return counts.reindex(self.contributor_ids).rename_axis("contributor").rename("n_items")

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (readable by :func:`load_arrays` and :meth:`load`) atomically."""
        arrays = {"images": self.images, "contributors": self.contributors, "item_ids": self.item_ids}
        if self.labels is not None:
            arrays["labels"] = self.labels
        from diffcredit.io import write_atomic

        write_atomic(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> ContributorData:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as npz:
            labels = npz["labels"] if "labels" in npz.files else None
            return cls(npz["images"], npz["contributors"], npz["item_ids"], labels)

    def _take(self, mask: np.ndarray) -> ContributorData:
        labels = None if self.labels is None else self.labels[mask]
        return ContributorData(self.images[mask], self.contributors[mask], self.item_ids[mask], labels)


def load_digits(manifest: str | Path | None = None) -> ContributorData:
    """scikit-learn's bundled 8×8 digits (1,797 items, ``digits-0000``...).

    Contributors are the classes ``digit0``..``digit9`` unless a manifest TSV (columns ``item``, ``contributor``)
    assigns every item to a contributor.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images[:, None] / 16.0 * 2.0 - 1.0).astype(np.float32)  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    item_ids = np.array([f"digits-{i:04d}" for i in range(len(images))])
    data = ContributorData(images, np.char.add("digit", labels.astype(str)), item_ids, labels)
    return data if manifest is None else assign(data, manifest)


def assign(data: ContributorData, manifest: str | Path) -> ContributorData:
    """Reassign the items of ``data`` to contributors from a TSV with columns ``item``, ``contributor``.

    Every item must appear exactly once, and only known items may appear.
    """
    table = _read_tsv(manifest, ("item", "contributor"))
    _check_cells(table, manifest, ("item", "contributor"))
    duplicated = table["item"][table["item"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{manifest}: item {duplicated.iloc[0]!r} is assigned more than once; list each item once")
    position = {str(item): i for i, item in enumerate(data.item_ids)}
    unknown = table["item"][~table["item"].isin(position)]
    if len(unknown):
        example = next(iter(position), "")
        raise ValueError(f"{manifest}: unknown item {unknown.iloc[0]!r}; items are named like {example!r}")
    if len(table) < len(data):
        missing = sorted(set(position) - set(table["item"]))
        raise ValueError(
            f"{manifest}: {len(missing)} items have no contributor, e.g. {missing[0]!r}; "
            "every item must belong to exactly one contributor"
        )
    contributors = np.empty(len(data), dtype=object)
    contributors[table["item"].map(position).to_numpy()] = table["contributor"].to_numpy()
    return ContributorData(data.images, contributors.astype(str), data.item_ids, data.labels)


def load_image_folder(
    manifest: str | Path, root: str | Path | None = None, *, owner: str | None = None
) -> ContributorData:
    """Images listed in a TSV with columns ``path``, ``contributor``; paths are relative to ``root``.

    ``root`` defaults to the manifest's folder. Images are read as grayscale when all of them are grayscale and as
    RGB otherwise; all must have the same size. Item ids are the paths as written in the manifest. With ``owner``
    (a reference set), the manifest needs only ``path`` and every image belongs to ``owner``.
    """
    from PIL import Image, UnidentifiedImageError

    columns = ("path",) if owner else ("path", "contributor")
    table = _read_tsv(manifest, columns)
    _check_cells(table, manifest, columns)
    owners = np.full(len(table), owner) if owner else table["contributor"]
    root = Path(manifest).parent if root is None else Path(root)
    pictures = []
    for row, path in enumerate(table["path"], start=2):
        try:
            with Image.open(root / path) as picture:
                picture.load()
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"{manifest} line {row}: cannot read image {str(root / path)!r} ({error})") from error
        if pictures and picture.size != pictures[0].size:
            raise ValueError(
                f"{manifest} line {row}: image {path!r} is {picture.size[0]}×{picture.size[1]} but "
                f"{table['path'].iloc[0]!r} is {pictures[0].size[0]}×{pictures[0].size[1]}; resize all images "
                "to one size"
            )
        pictures.append(picture)
    grayscale = all(picture.mode in ("1", "L", "LA") for picture in pictures)
    mode = "L" if grayscale else "RGB"
    stacked = np.stack([np.asarray(picture.convert(mode)) for picture in pictures])
    return ContributorData(_to_unit_range(_channels_first(stacked)), owners, table["path"])


def load_arrays(path: str | Path, *, owner: str | None = None) -> ContributorData:
    """An ``.npz`` with ``images`` and ``contributors`` and, optionally, ``item_ids`` and ``labels``.

    ``images`` is ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C of 1, 3 or 4; if both axis 1 and the last
    axis could be channels, axis 1 is), either uint8 (0..255) or float already scaled to ``[-1, 1]``. Item ids
    default to ``item-000000``... by position. With ``owner`` (a reference set), ``contributors`` is not needed and
    every image belongs to ``owner``.
    """
    required = ("images",) if owner else ("images", "contributors")
    with np.load(path, allow_pickle=False) as npz:
        missing = [key for key in required if key not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing array {missing[0]!r} (found {', '.join(npz.files)})")
        arrays = {key: npz[key] for key in npz.files}
    images = _channels_first(arrays["images"], where=str(path))
    item_ids = arrays.get("item_ids", np.array([f"item-{i:06d}" for i in range(len(images))]))
    owners = np.full(len(images), owner) if owner else arrays["contributors"]
    return ContributorData(_to_unit_range(images, where=str(path)), owners, item_ids, arrays.get("labels"))


def load_source(source: str, path: str | Path | None = None, manifest: str | Path | None = None) -> ContributorData:
    """Load a dataset by source name.

    - ``digits``: the bundled digits; ``manifest`` (``item``, ``contributor``) optionally reassigns items.
    - ``folder``: ``manifest`` (``path``, ``contributor``) lists images under ``path`` (default: its folder).
    - ``npz``: arrays at ``path``; ``manifest`` (``item``, ``contributor``) optionally reassigns items.
    - ``marketplace``: the planted contributors of :func:`load_marketplace` (``path`` and ``manifest`` unused).
    - ``glyphs``: letters rendered from the fonts matplotlib ships, one contributor per font
      (:func:`diffcredit.glyphs.load_source`); ``manifest`` (``item``, ``contributor``) optionally reassigns items.
    """
    if source == "glyphs":
        if path is not None:
            raise ValueError("source 'glyphs' is rendered from matplotlib's fonts: leave path null")
        from diffcredit.glyphs import load_source as load_glyph_source

        data = load_glyph_source()
        return data if manifest is None else assign(data, manifest)
    if source == "marketplace":
        if path is not None or manifest is not None:
            raise ValueError("source 'marketplace' is built from scikit-learn's digits: leave path and manifest null")
        return load_marketplace()[0]
    if source == "digits":
        return load_digits(manifest)
    if source == "folder":
        if manifest is None:
            raise ValueError("source 'folder' needs a manifest TSV with columns path, contributor")
        return load_image_folder(manifest, root=path)
    if source == "npz":
        if path is None:
            raise ValueError("source 'npz' needs the path of an .npz file")
        data = load_arrays(path)
        return data if manifest is None else assign(data, manifest)
    raise ValueError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")


def contributor_ids(source: str, path: str | Path | None = None, manifest: str | Path | None = None) -> list[str]:
    """The contributor ids of a source, in the order :func:`load_source` gives them, without decoding images.

    The workflow calls this when it plans coalitions, before any job runs; a folder source is read from its
    manifest alone (items appear in manifest order, so first appearance there is first appearance in the data).
    """
    if source == "folder" and manifest is not None:
        table = _read_tsv(manifest, ("path", "contributor"))
        _check_cells(table, manifest, ("path", "contributor"))
        ids = list(dict.fromkeys(str(cid) for cid in table["contributor"]))
        return [validate_contributor_id(cid, where=str(manifest)) for cid in ids]
    if source == "glyphs" and path is None and manifest is None:
        from diffcredit.glyphs import CONTRIBUTOR_FONTS  # the fonts, without rendering a glyph

        return list(CONTRIBUTOR_FONTS)
    return load_source(source, path, manifest).contributor_ids


def split_heldout(data: ContributorData, fraction: float, seed: int) -> tuple[ContributorData, ContributorData]:
    """Split into (train, held-out), stratified per contributor.

    Each contributor gives ``round(fraction * n_items)`` items to the held-out set (the real reference images of FID)
    but always keeps at least one in train. Both parts keep the original item order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(data), dtype=bool)
    for contributor in data.contributor_ids:
        (members,) = np.nonzero(data.contributors == contributor)
        n_heldout = min(round(fraction * len(members)), len(members) - 1)
        heldout[rng.choice(members, size=n_heldout, replace=False)] = True
    return data._take(~heldout), data._take(heldout)


TRUSTED, HELDOUT = "trusted reference", "contributors' held-out items"  # the two yardsticks (reference.json)
UNTRUSTED_NOTE = (
    "the contributors shape their own yardstick: the reference images are a held-out share of their items and the "
    "feature extractor is trained on their training items, so a contributor's upload moves the ruler it is measured "
    "by (noise can score well); name the buyer's own images in data.reference before paying by these values"
)


def yardstick(reference: dict | None, *, marketplace: bool = False) -> str:
    """Which yardstick a run's reference-based properties use; refuse the held-out split in a marketplace.

    `reference` is the config's ``data.reference`` (null: the contributors' held-out split). A config that declares
    ``marketplace: true`` pays by the values, so it must name a trusted reference.
    """
    if reference is not None:
        return TRUSTED
    if marketplace:
        raise ValueError(
            "marketplace: true needs a trusted reference, but data.reference is null, so the contributors' held-out "
            "items would be the yardstick they are paid by: set data.reference to the buyer's own images, e.g. "
            "{source: npz, path: buyer.npz} (see config/README.md)"
        )
    return HELDOUT


REFERENCE_OWNER = "reference"  # the owner of every image of a trusted reference: the buyer, not a contributor
REFERENCE_SOURCES = ("digits", "folder", "npz", "marketplace")


def load_reference(source: str, path: str | Path | None = None, manifest: str | Path | None = None) -> ContributorData:
    """The buyer's trusted reference images (``data.reference``), owned by :data:`REFERENCE_OWNER`.

    - ``digits``: scikit-learn's digits; ``manifest`` (a TSV with column ``item``) picks the items, default all.
    - ``folder``: ``manifest`` (column ``path``) lists images under ``path`` (default: the manifest's folder).
    - ``npz``: ``images`` (and optionally ``labels``, ``item_ids``) at ``path``.
    - ``marketplace``: the reference part of :func:`load_marketplace`, disjoint from its contributors.

    Labels, where the source has them, train the reference's feature extractor.
    """
    if source == "marketplace":
        return load_marketplace()[1]
    if source == "digits":
        digits = load_digits()
        if manifest is not None:
            table = _read_tsv(manifest, ("item",))
            _check_cells(table, manifest, ("item",))
            chosen = np.isin(digits.item_ids, table["item"].to_numpy())
            unknown = sorted(set(table["item"]) - set(digits.item_ids))
            if unknown:
                raise ValueError(f"{manifest}: unknown item {unknown[0]!r}; items are named like 'digits-0000'")
            digits = digits._take(chosen)
        return ContributorData(digits.images, np.full(len(digits), REFERENCE_OWNER), digits.item_ids, digits.labels)
    if source == "folder":
        if manifest is None:
            raise ValueError("a 'folder' reference needs a manifest TSV with a column path")
        return load_image_folder(manifest, root=path, owner=REFERENCE_OWNER)
    if source == "npz":
        if path is None:
            raise ValueError("an 'npz' reference needs the path of an .npz file with an 'images' array")
        return load_arrays(path, owner=REFERENCE_OWNER)
    raise ValueError(f"unknown reference source {source!r}; use one of {', '.join(REFERENCE_SOURCES)}")


def check_reference(reference: ContributorData, train: ContributorData) -> str | None:
    """Refuse a reference that cannot be a yardstick for `train`; return a warning if it overlaps `train`.

    Raises ValueError for a reference without images and for images whose channels or size differ from the
    training images. Overlap is found by content (a SHA-256 of each image's pixels), so a renamed copy counts;
    the warning says how many reference images are copies of training items, their share, and whose items they are.
    """
    if len(reference) == 0:
        raise ValueError(
            "the reference (data.reference) has no images: name the buyer's own images "
            "({source, path, manifest}), or set data.reference to null for the contributors' held-out split"
        )
    if reference.images.shape[1:] != train.images.shape[1:]:
        (c, h, w), (tc, th, tw) = reference.images.shape[1:], train.images.shape[1:]
        raise ValueError(
            f"the reference images are {c}-channel {h}x{w} but the training images are {tc}-channel {th}x{tw}: "
            "convert the reference to the training images' size and channels"
        )
    owners = dict(zip(image_digests(train.images), zip(train.contributors, train.item_ids, strict=True), strict=True))
    copies = [owners[d] for d in image_digests(reference.images) if d in owners]
    if not copies:
        return None
    whose: dict[str, int] = {}
    for contributor, _ in copies:
        whose[contributor] = whose.get(contributor, 0) + 1
    listed = ", ".join(f"{c} ({n})" for c, n in sorted(whose.items(), key=lambda kv: -kv[1])[:5])
    return (
        f"{len(copies)} of {len(reference)} reference images ({len(copies) / len(reference):.1%}) are exact copies "
        f"of training items (e.g. {copies[0][1]!r}), from contributors {listed}: those contributors are scored "
        "against their own items; remove the copies from the reference or from the training data"
    )


def image_digests(images: np.ndarray) -> list[str]:
    """A SHA-256 of each image's float32 pixels [C, H, W]: equal exactly for exact copies."""
    pixels = np.ascontiguousarray(images, dtype=np.float32)
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in pixels]


MARKETPLACE_CLASSES = (0, 1, 2, 3, 4)
MARKETPLACE_CLEAN = tuple(f"digit{label}" for label in MARKETPLACE_CLASSES)
MARKETPLACE_CORRUPTED = ("noisy3", "blurred1", "glyphs", "noise")  # degraded or off-distribution uploads
MARKETPLACE_DUPLICATE = ("dup2", "digit2")  # an exact copy and its original


def marketplace_expectations(values: pd.DataFrame) -> dict[str, bool | None]:
    """Whether a valuation of :func:`load_marketplace`'s contributors gives the answer known by construction.

    ``values``: indexed by contributor, with ``value`` and, for rankings that have them, ``ci_low``/``ci_high``.
    ``corrupted_below_clean``: every corrupted contributor below every clean one; ``duplicate_equal``: ``dup2``'s
    and ``digit2``'s intervals overlap (None for a ranking without intervals).
    """
    missing = sorted({*MARKETPLACE_CLEAN, *MARKETPLACE_CORRUPTED, *MARKETPLACE_DUPLICATE} - set(values.index))
    if missing:
        raise ValueError(f"not a marketplace valuation: no value for {', '.join(missing)}")
    below = bool(
        values.loc[list(MARKETPLACE_CORRUPTED), "value"].max() < values.loc[list(MARKETPLACE_CLEAN), "value"].min()
    )
    equal = None
    if {"ci_low", "ci_high"} <= set(values.columns):
        copy, original = (values.loc[name] for name in MARKETPLACE_DUPLICATE)
        if np.isfinite(np.array([copy.ci_low, copy.ci_high, original.ci_low, original.ci_high], dtype=float)).all():
            equal = bool(copy.ci_low <= original.ci_high and original.ci_low <= copy.ci_high)
    return {"corrupted_below_clean": below, "duplicate_equal": equal}


def load_marketplace(seed: int = 0) -> tuple[ContributorData, ContributorData]:
    """A marketplace whose answer is known by construction: (contributors, trusted reference), from `seed`.

    scikit-learn's digits of classes 0-4 are split per class, deterministically: 40% become the buyer's reference
    (with labels), the rest the contributors' pool; the two never share an item. The seed fixes the market; the run's
    seed (training, noise) does not change it, so the ranking can be compared across run seeds. Contributors:

    - ``digit0``..``digit4`` (clean): one class each, from the pool (``digit4`` minus the items of ``few4``).
    - ``dup2`` (exact duplicate): the very images of ``digit2`` under new item ids; Shapley symmetry makes it
      equal to ``digit2`` within the intervals.
    - ``few4`` (very few items): 6 clean class-4 items of the pool; a small value, near zero.
    - ``noisy3`` (noisy copies): ``digit3``'s images plus Gaussian noise of sd 0.6 (30% of the [-1, 1] range),
      clipped; below every clean contributor.
    - ``blurred1`` (blurred copies): ``digit1``'s images blurred by a Gaussian of sd 1 pixel; below every clean one.
    - ``glyphs`` (off-distribution): Latin letters rendered with the DejaVu fonts matplotlib ships, 8×8 like the
      digits; below every clean one: it adds nothing to coverage and harms density.
    - ``noise`` (garbage): uniform noise images; the same expectation (the case of issue 11).

    Every corrupted contributor has as many items as a clean one. No contributor has labels: the reference's own
    labels train the feature extractor.
    """
    from scipy.ndimage import gaussian_filter

    from diffcredit.seeds import derive_seed

    rng = np.random.default_rng(derive_seed(seed, "marketplace"))
    digits = load_digits()
    in_reference = np.zeros(len(digits), dtype=bool)
    pool: dict[int, np.ndarray] = {}
    for label in MARKETPLACE_CLASSES:
        (members,) = np.nonzero(digits.labels == label)
        members = rng.permutation(members)
        n_reference = round(0.4 * len(members))
        in_reference[members[:n_reference]] = True
        pool[label] = np.sort(members[n_reference:])
    reference = digits._take(in_reference)
    reference = ContributorData(
        reference.images, np.full(len(reference), REFERENCE_OWNER), reference.item_ids, reference.labels
    )

    parts: list[tuple[str, np.ndarray, np.ndarray]] = []  # (contributor, images, item ids)

    def add(contributor: str, images: np.ndarray, item_ids: np.ndarray | None = None) -> None:
        ids = np.array([f"{contributor}-{i:04d}" for i in range(len(images))]) if item_ids is None else item_ids
        parts.append((contributor, np.clip(images, -1.0, 1.0).astype(np.float32), ids))

    few = pool[4][:6]
    for label in MARKETPLACE_CLASSES:
        items = pool[label][6:] if label == 4 else pool[label]
        add(f"digit{label}", digits.images[items], digits.item_ids[items])
    n = len(pool[0])
    add("dup2", digits.images[pool[2]])
    add("few4", digits.images[few], digits.item_ids[few])
    add("noisy3", digits.images[pool[3]] + rng.normal(0.0, 0.6, size=digits.images[pool[3]].shape))
    add("blurred1", gaussian_filter(digits.images[pool[1]], sigma=(0, 0, 1.0, 1.0)))
    add("glyphs", _glyphs(n))
    add("noise", rng.uniform(-1.0, 1.0, size=(n, *digits.images.shape[1:])))
    images = np.concatenate([images for _, images, _ in parts])
    owners = np.concatenate([np.full(len(images), cid) for cid, images, _ in parts])
    item_ids = np.concatenate([ids for _, _, ids in parts])
    return ContributorData(images, owners, item_ids), reference


def _glyphs(n: int) -> np.ndarray:
    """`n` letters rendered by matplotlib (DejaVu fonts, cycling letters and styles) as 8×8 images in [-1, 1].

    Each glyph is drawn white on black at 32×32 pixels and averaged over 4×4 blocks, as the digits were made from
    32×32 bitmaps, then scaled so that its brightest cell is +1.
    """
    from matplotlib import get_data_path
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fonts = [
        Path(get_data_path()) / "fonts" / "ttf" / f"DejaVu{style}.ttf"
        for style in ("Sans", "Sans-Bold", "Serif", "Serif-Bold", "SansMono")
    ]
    letters = "ABCDEFGHJKLMNPRSTUVWXYZabdefghkmnpqrtuwxyz"
    glyphs = np.empty((n, 1, 8, 8), dtype=np.float32)
    for i in range(n):
        figure = Figure(figsize=(1, 1), dpi=32, facecolor="black")
        canvas = FigureCanvasAgg(figure)
        figure.text(
            0.5,
            0.5,
            letters[i % len(letters)],
            color="white",
            ha="center",
            va="center",
            fontsize=64,
            fontproperties=FontProperties(fname=fonts[(i // len(letters)) % len(fonts)]),
        )
        canvas.draw()
        ink = np.asarray(canvas.buffer_rgba())[..., 0].astype(np.float64) / 255.0
        cells = ink.reshape(8, 4, 8, 4).mean(axis=(1, 3))
        glyphs[i, 0] = cells / max(cells.max(), 1e-12) * 2.0 - 1.0
    return glyphs


def write_manifest(data: ContributorData, path: str | Path) -> None:
    """Write the contributors TSV (``contributor``, ``n_items``) that the CLI and the workflow read."""
    data.counts().reset_index().to_csv(path, sep="\t", index=False)


def _read_tsv(path: str | Path, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"manifest {str(path)!r} not found (relative paths start at the working directory, {os.getcwd()}); "
            f"give a tab-separated file with columns {', '.join(columns)}"
        )
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if table.empty:
        raise ValueError(f"{path} lists no items; give one row per item with columns {', '.join(columns)}")
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column {missing[0]!r}; expected a tab-separated file with columns "
            f"{', '.join(columns)} (found {', '.join(map(str, table.columns))})"
        )
    return table


def _check_cells(table: pd.DataFrame, path: str | Path, columns: tuple[str, ...]) -> None:
    """Refuse blank cells, naming the line (line 1 is the header)."""
    for column in columns:
        blank = table[column].str.strip() == ""
        if blank.any():
            row = int(np.argmax(blank.to_numpy()))
            raise ValueError(
                f"{path} line {row + 2}: empty {column!r} for {table.iloc[row].to_dict()}; "
                "every item must belong to exactly one contributor"
            )


def _channels_first(images: np.ndarray, where: str = "images") -> np.ndarray:
    """``[N, H, W]`` / ``[N, H, W, C]`` / ``[N, C, H, W]`` -> ``[N, C, H, W]``."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[1] not in (1, 3, 4) and images.shape[3] in (1, 3, 4):
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in (1, 3, 4):
        return images
    raise ValueError(
        f"{where}: images of shape {images.shape} are not [N, H, W], [N, H, W, C] or [N, C, H, W] with 1, 3 or 4 "
        "channels"
    )


def _to_unit_range(images: np.ndarray, where: str = "images") -> np.ndarray:
    """uint8 0..255 -> float32 [-1, 1]; floats must already be in [-1, 1]."""
    if images.dtype == np.uint8:
        return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{where}: images must be uint8 or float, got {images.dtype}")
    inside = (np.abs(images) <= 1.0).reshape(len(images), -1).all(axis=1)  # False for NaN and inf too
    if not inside.all():
        item = int(np.argmin(inside))
        raise ValueError(
            f"{where}: float images must lie in [-1, 1] (item {item} does not); store uint8 0..255 or rescale"
        )
    return np.ascontiguousarray(images, dtype=np.float32)
