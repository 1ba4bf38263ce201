"""Contributors: who owns which training item, and the ids that name them.

Ids become path parts and TSV cells, so they are checked once, here, for everyone. A :class:`ContributorData` is a
dataset in which every item belongs to exactly one contributor (a player of the Shapley game). This module imports only
numpy at import time: the CLI imports it and must start fast, so pandas, PIL and scikit-learn load inside functions.
"""

from __future__ import annotations

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

SOURCES = ("digits", "folder", "npz")


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
        for cid, index in zip(*np.unique(contributors, return_index=True)):
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


def load_image_folder(manifest: str | Path, root: str | Path | None = None) -> ContributorData:
    """Images listed in a TSV with columns ``path``, ``contributor``; paths are relative to ``root``.

    ``root`` defaults to the manifest's folder. Images are read as grayscale when all of them are grayscale and as
    RGB otherwise; all must have the same size. Item ids are the paths as written in the manifest.
    """
    from PIL import Image, UnidentifiedImageError

    table = _read_tsv(manifest, ("path", "contributor"))
    _check_cells(table, manifest, ("path", "contributor"))
    root = Path(manifest).parent if root is None else Path(root)
    pictures = []
    for row, (path, contributor) in enumerate(zip(table["path"], table["contributor"]), start=2):
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
    return ContributorData(_to_unit_range(_channels_first(stacked)), table["contributor"], table["path"])


def load_arrays(path: str | Path) -> ContributorData:
    """An ``.npz`` with ``images`` and ``contributors`` and, optionally, ``item_ids`` and ``labels``.

    ``images`` is ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C of 1, 3 or 4; if both axis 1 and the last
    axis could be channels, axis 1 is), either uint8 (0..255) or float already scaled to ``[-1, 1]``. Item ids
    default to ``item-000000``... by position.
    """
    with np.load(path, allow_pickle=False) as npz:
        missing = [key for key in ("images", "contributors") if key not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing array {missing[0]!r} (found {', '.join(npz.files)})")
        arrays = {key: npz[key] for key in npz.files}
    images = _channels_first(arrays["images"], where=str(path))
    item_ids = arrays.get("item_ids", np.array([f"item-{i:06d}" for i in range(len(images))]))
    return ContributorData(_to_unit_range(images, where=str(path)), arrays["contributors"], item_ids,
                           arrays.get("labels"))


def load_source(
    source: str, path: str | Path | None = None, manifest: str | Path | None = None
) -> ContributorData:
    """Load a dataset by source name.

    - ``digits``: the bundled digits; ``manifest`` (``item``, ``contributor``) optionally reassigns items.
    - ``folder``: ``manifest`` (``path``, ``contributor``) lists images under ``path`` (default: its folder).
    - ``npz``: arrays at ``path``; ``manifest`` (``item``, ``contributor``) optionally reassigns items.
    """
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


def contributor_ids(
    source: str, path: str | Path | None = None, manifest: str | Path | None = None
) -> list[str]:
    """The contributor ids of a source, in the order :func:`load_source` gives them, without decoding images.

    The workflow calls this when it plans coalitions, before any job runs; a folder source is read from its
    manifest alone (items appear in manifest order, so first appearance there is first appearance in the data).
    """
    if source == "folder" and manifest is not None:
        table = _read_tsv(manifest, ("path", "contributor"))
        _check_cells(table, manifest, ("path", "contributor"))
        ids = list(dict.fromkeys(str(cid) for cid in table["contributor"]))
        return [validate_contributor_id(cid, where=str(manifest)) for cid in ids]
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
