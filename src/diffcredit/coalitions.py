"""Coalition planning: which coalitions of contributors to evaluate, for each estimator.

A plan is a table with one row per distinct member set, in plan order:

- ``coalition``: generated id ``c000000``, ``c000001``, ... (a path part for the per-coalition jobs);
- ``members``: comma-separated contributor ids in the contributors file's order, ``""`` for the empty coalition;
- ``estimator``: the estimator the plan was made for (the same on every row; ``aggregate`` reads it);
- ``repeats``: how many utility measurements (training seeds) the coalition should get. The empty and the grand
  coalition and rows 0 and 1 (∅ and N in kernelshap and permutation plans) get ``bound_repeats`` (2 by default),
  every other coalition 1, so that one utility per coalition elsewhere still yields an estimate of the seed noise
  (where v(∅) does not vary with the seed, ``null_has_noise=False``, ∅ gets 1 and N 2·``bound_repeats`` − 1);
- sampler columns (see :mod:`diffcredit.estimators` for the estimators):

  =================== ============================================================================================
  exact               none: all 2^n coalitions in bit-mask order (contributor j is bit j).
  loo                 ``left_out``: the contributor missing from the row ("" for the grand coalition, row 0).
  banzhaf             ``draw``: index of the Bernoulli(1/2) draw that produced the row; repeated member sets are
                      skipped, so the rows are a uniform sample without replacement of all 2^n coalitions.
  kernelshap,         ``pair``, ``stratum``, ``samples``: rows 0 and 1 are the empty and the grand coalition, then
  kernelshap_leverage distinct pairs (S, N∖S) as consecutive rows. Stratum k holds the pairs with min(|S|, n−|S|) = k;
                      within it the pairs come in a fixed seeded random order without replacement, and the next pair
                      goes to the incomplete stratum with the largest w_k/(count_k + 1) (ties: the smaller k). For
                      ``kernelshap`` w_k is the Shapley-kernel mass of the sizes k and n−k (proportional
                      allocation: sizes 1 and n−1 fill first and a complete stratum is enumerated); for
                      ``kernelshap_leverage`` w_k is the number of sizes in the stratum (Musco & Witter's leverage
                      scores give every size the same mass).
  kernelshap_unpaired ``draw``, ``stratum``, ``samples``: rows 0 and 1 are the empty and the grand coalition, then
                      single coalitions (no complements). Stratum s holds the coalitions of size s, in a fixed
                      seeded random order without replacement; the next coalition goes to the incomplete size with
                      the largest p(s)/(count_s + 1), p(s) ∝ 1/(s(n−s)) (sizes 1 and n−1 fill first; a complete
                      size is enumerated, as shapiq's border trick).
  kernelshap_unbiased ``pair``, ``samples``: i.i.d. draws (size s with p(s) ∝ (n-1)/(s(n-s)), then a uniform subset
                      S), each adding S and its complement; a draw of an already planned pair costs nothing but
                      still counts.
  permutation         ``permutation``, ``position``: the antithetic draw (a random permutation and its reverse)
                      that first produced the row and the row's size in it; rows 0 and 1 are the empty and the grand
                      coalition, then each draw adds the prefixes of both orders not planned yet. ``samples``.
  =================== ============================================================================================

``samples`` lists the draws (kernelshap pairs, kernelshap_unpaired coalitions, antithetic permutation chains) that
are complete once the table reaches this row, ``;``-separated, each as the comma-separated coalition ids it uses
(``S,complement``, a single id, or the chain ``∅,{π1},{π1,π2},…,N`` followed by the chain of the reversed order).
A draw is recorded on the last new row it needs; a draw that needs no new row waits for the next row. Each draw
appears exactly once.

``budget`` is the number of rows (distinct coalitions, the cost unit) for the sampled estimators; ``exact`` and
``loo`` ignore it. Randomness is drawn in fixed blocks from ``SeedSequence(seed, spawn_key=(label, ...))``, so rows
never depend on the budget: ``plan(..., budget=m)`` is the first m rows of any larger plan, and raising the budget
only appends coalition jobs.

:func:`read_coalitions` and :func:`parse_coalitions` accept any coalition table (also the LDS subsets, which may
repeat a member set); :func:`parse_plan` adds the checks an estimator needs before aggregation.
"""

from __future__ import annotations

import graphlib
import heapq
import itertools
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import comb

from diffcredit.contributors import validate_contributor_id
from diffcredit.io import write_table

_INTEGER_COLUMNS = frozenset({"draw", "pair", "stratum", "permutation", "position", "repeats"})
BOUND_REPEATS = 2  # utility measurements of the empty and the grand coalition by default
MAX_EXACT_CONTRIBUTORS = 16
# Coalition ids become path parts. Planned ones are c000000, c000001, ...; other tables (e.g. the LDS subsets,
# s000000, ...) may use other prefixes.
COALITION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

_STREAM = zlib.crc32(b"diffcredit.coalitions")  # keeps this stream apart from other children of the run seed
_STRATA = zlib.crc32(b"diffcredit.coalitions.strata")  # the kernelshap strata's own orders
_SIZES = zlib.crc32(b"diffcredit.coalitions.sizes")  # the kernelshap_unpaired sizes' own orders
_BLOCK = 256  # draws per random block; fixed, so the plan does not depend on the budget
_MAX_DRAWS_PER_ROW = 200  # give up (instead of looping) when almost every coalition is already planned
_ENUMERATED_STRATUM = 2**16  # kernelshap strata with at most this many pairs are enumerated, then shuffled
_STRATUM_BLOCK = 32  # draws per random block of a large stratum (most strata need few pairs)
_TEXT_ROWS = 1024  # member strings are built this many rows at a time


def coalition_id(index: int) -> str:
    """Return the id of the coalition in plan row ``index``."""
    return f"c{index:06d}"


def read_contributors(path: str | os.PathLike[str]) -> list[str]:
    """Read a TSV with a ``contributor`` column; return the ids in file order, validated and unique."""
    table = _read_tsv(path)
    if "contributor" not in table.columns:
        raise ValueError(f"{path}: no 'contributor' column (columns: {list(table.columns)}); add a header line")
    ids = [validate_contributor_id(v, where=f"{path} row {r + 1}") for r, v in enumerate(table["contributor"])]
    _refuse_duplicates(ids, f"{path}: duplicate contributor")
    return ids


def plan(
    contributors: Sequence[str],
    estimator: str,
    budget: int | None,
    seed: int,
    *,
    bound_repeats: int = BOUND_REPEATS,
    null_has_noise: bool = True,
) -> pd.DataFrame:
    """Plan the coalitions to evaluate for ``estimator`` (see the module docstring for the table).

    ``null_has_noise``: whether v(∅) varies with the seed (an untrained model does; a LoRA's base does not): if not,
    ∅ is measured once and N 2·``bound_repeats`` − 1 times.
    """
    from diffcredit.estimators import estimator_named  # the registry refers to this module's planners

    ids = list(contributors)
    for position, value in enumerate(ids):
        validate_contributor_id(value, where=f"contributor {position + 1}")
    _refuse_duplicates(ids, "duplicate contributor")
    if not ids:
        raise ValueError("no contributors: a plan needs at least one")
    entry = estimator_named(estimator)
    if isinstance(bound_repeats, bool) or int(bound_repeats) != bound_repeats or bound_repeats < 1:
        raise ValueError(f"bound_repeats must be a positive number of measurements, got {bound_repeats!r}")
    n = len(ids)
    if entry.sampled:
        if budget is None or isinstance(budget, bool) or int(budget) != budget or budget < 1:
            raise ValueError(f"budget must be a positive number of coalitions for {estimator!r}, got {budget!r}")
        budget = int(budget)
        if budget > 2**n:
            raise ValueError(
                f"budget {budget} exceeds the 2^{n} = {2**n} distinct coalitions of {n} contributors; "
                "use --estimator exact"
            )
    else:
        budget = None
    table = _collect(ids, estimator, budget, entry.columns, entry.planner(ids, seed))
    repeats = _repeats(table["members"], n, int(bound_repeats), null_has_noise)
    table["repeats"] = pd.array(repeats, dtype="Int64")
    return table


def _repeats(members: pd.Series, n: int, bound: int, null_has_noise: bool = True) -> np.ndarray:
    """``bound`` measurements for rows 0 and 1 and for the empty and the grand coalition, 1 elsewhere; without
    ``null_has_noise``, 1 for ∅ and 2·``bound`` − 1 for N (repeating a number that cannot change would only cost
    measurements; on N they give the seed noise more degrees of freedom).

    Rows 0 and 1 are ∅ and N in kernelshap and permutation plans; the rule looks at a row alone, so it keeps
    plans prefix-stable, and every plan gets at least two repeated coalitions for the seed noise.
    """
    size = np.where(members == "", 0, members.str.count(",") + 1)
    repeated = (size == 0) | (size == n) | (np.arange(len(members)) < 2)
    repeats = np.where(repeated, bound, 1)
    if not null_has_noise:
        repeats[size == 0] = 1
        repeats[size == n] = 2 * bound - 1
    return repeats


def exact_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    """Every coalition once, in bit-mask order (the seed is not used)."""
    n = len(ids)
    if n > MAX_EXACT_CONTRIBUTORS:
        raise ValueError(
            f"exact Shapley needs 2^{n} coalitions for {n} contributors (limit {MAX_EXACT_CONTRIBUTORS}); "
            "use a sampled estimator: --estimator kernelshap, permutation or banzhaf with a --budget"
        )
    masks = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    yield _Draws(masks, np.arange(2**n), {}, sample=False)


def loo_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    """The grand coalition, then the grand coalition without each contributor in turn (the seed is not used)."""
    n = len(ids)
    masks = ~np.vstack([np.zeros(n, bool), np.eye(n, dtype=bool)])
    yield _Draws(masks, np.arange(n + 1), {"left_out": np.array(["", *ids], dtype=object)}, sample=False)


@dataclass(frozen=True)
class _Draws:
    """Consecutive draws: the member sets they need in order, the draw of each set, and its sampler columns.

    ``sample`` says whether the draws are recorded in ``samples`` (kernelshap pairs, permutation chains) or are
    plain rows (banzhaf draws, the leading empty and grand coalition).
    """

    masks: np.ndarray  # (k, n) bool
    draw: np.ndarray  # (k,) int, equal for the sets of one draw
    columns: dict[str, np.ndarray]
    sample: bool


def _blocks(seed: int, *label: int) -> Iterator[tuple[int, np.random.Generator]]:
    block = 0
    while True:
        yield block, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*label, block)))
        block += 1


def _permutations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Return a block of uniform random permutations of range(n), one per row."""
    return rng.permuted(np.broadcast_to(np.arange(n), (_BLOCK, n)), axis=1)


def _bounds(n: int) -> _Draws:
    """The empty and the grand coalition lead kernelshap and permutation plans (so N fixes the order)."""
    return _Draws(np.array([[False] * n, [True] * n]), np.array([-2, -1]), {}, sample=False)


def banzhaf_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    n = len(ids)
    for block, rng in _blocks(seed, _STREAM):
        index = block * _BLOCK + np.arange(_BLOCK)
        yield _Draws(rng.random((_BLOCK, n)) < 0.5, index, {"draw": index}, sample=False)


def kernelshap_iid_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    """I.i.d. paired draws: a size from the Shapley kernel, then a uniform subset of that size and its complement."""
    n = len(ids)
    yield _bounds(n)
    if n < 2:
        return
    sizes, p = np.arange(1, n), size_mass(n)
    for block, rng in _blocks(seed, _STREAM):
        drawn = rng.choice(sizes, size=_BLOCK, p=p)
        mask = np.empty((_BLOCK, n), bool)
        # the first `size` contributors of a random permutation: a uniform subset of that size
        mask[np.arange(_BLOCK)[:, None], _permutations(rng, n)] = np.arange(n) < drawn[:, None]
        index = np.repeat(block * _BLOCK + np.arange(_BLOCK), 2)
        yield _Draws(np.stack([mask, ~mask], axis=1).reshape(-1, n), index, {"pair": index}, sample=True)


def stratum_pairs(n: int) -> np.ndarray:
    """Number of distinct pairs {S, N∖S} with min(|S|, n−|S|) = k, for k = 1 … n//2 (index k − 1)."""
    k = np.arange(1, n // 2 + 1)
    return np.where(2 * k == n, comb(n, k, exact=False) / 2, comb(n, k, exact=False))


def size_kernel(n: int) -> np.ndarray:
    """The Shapley kernel's weight 1/(s(n−s)) of each coalition size s = 1 … n−1, unnormalised."""
    s = np.arange(1, n)
    return 1.0 / (s * (n - s))


def size_mass(n: int) -> np.ndarray:
    """Shapley-kernel probability p(s) ∝ 1/(s(n−s)) of each coalition size s = 1 … n−1."""
    p = size_kernel(n)
    return p / p.sum()


def kernel_mass(n: int) -> np.ndarray:
    """Shapley-kernel probability of each stratum k = 1 … n//2: p(k) + p(n−k), with p(s) of :func:`size_mass`."""
    p = size_mass(n)
    k = np.arange(1, n // 2 + 1)
    return np.where(2 * k == n, p[k - 1], p[k - 1] + p[n - k - 1])


def kernelshap_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    """Stratified paired draws without replacement, allocated in proportion to the kernel mass of each stratum."""
    return _stratified_draws(len(ids), seed, kernel_mass(len(ids)) if len(ids) > 1 else np.zeros(0))


def leverage_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    """Stratified paired draws without replacement, allocated in proportion to the number of sizes per stratum."""
    n = len(ids)
    k = np.arange(1, n // 2 + 1)
    return _stratified_draws(n, seed, np.where(2 * k == n, 1.0, 2.0))


def kernelshap_unpaired_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    """Stratified single coalitions without replacement by size, allocated in proportion to the Shapley kernel's
    mass of each size; no complements (shapiq's KernelSHAP design, with its border trick)."""
    n = len(ids)
    yield _bounds(n)
    sizes = np.arange(1, n)
    streams = [_subset_sequence(n, s, seed, _SIZES) for s in sizes]
    drawn = 0
    for chosen in _allocation(size_kernel(n), comb(n, sizes, exact=False)):  # normalising would move ties
        index = drawn + np.arange(len(chosen))
        drawn += len(chosen)
        mask = np.array([next(streams[k]) for k in chosen])
        yield _Draws(mask, index, {"draw": index, "stratum": sizes[chosen]}, sample=True)


def _stratified_draws(n: int, seed: int, weight: np.ndarray) -> Iterator[_Draws]:
    yield _bounds(n)
    streams = [_stratum_sequence(n, k, seed) for k in range(1, n // 2 + 1)]
    pair = 0
    for chosen in _allocation(weight, stratum_pairs(n)):
        mask = np.array([next(streams[k]) for k in chosen])
        index = np.repeat(pair + np.arange(len(chosen)), 2)
        pair += len(chosen)
        stratum = np.repeat(np.array(chosen) + 1, 2)
        yield _Draws(
            np.stack([mask, ~mask], axis=1).reshape(-1, n), index, {"pair": index, "stratum": stratum}, sample=True
        )


def _allocation(weight: np.ndarray, population: np.ndarray) -> Iterator[list[int]]:
    """Blocks of stratum indices: each next unit goes to the incomplete stratum with the largest
    w_k/(count_k + 1) (ties: the smaller k); a stratum leaves once all its ``population`` units are allocated."""
    count = np.zeros(len(weight), np.int64)
    heap = [(-w, k) for k, w in enumerate(weight)]  # a max-heap on w_k / (count_k + 1)
    heapq.heapify(heap)
    while heap:
        chosen = []
        while heap and len(chosen) < _BLOCK:
            _, k = heapq.heappop(heap)
            chosen.append(k)
            count[k] += 1
            if count[k] < population[k]:
                heapq.heappush(heap, (-weight[k] / (count[k] + 1), k))
        yield chosen


def _stratum_sequence(n: int, k: int, seed: int) -> Iterator[np.ndarray]:
    """The distinct pairs of stratum k in a fixed random order, each as the mask of its side S with |S| = k.

    A half-size pair (2k = n) is represented by its side holding contributor 0.
    """
    return _subset_sequence(n, k, seed, _STRATA, halve=2 * k == n)


def _subset_sequence(n: int, size: int, seed: int, label: int, halve: bool = False) -> Iterator[np.ndarray]:
    """The distinct subsets of ``size`` in a fixed random order (with ``halve``, only those holding contributor 0).

    Small populations are enumerated and shuffled; large ones are drawn at random, skipping subsets already drawn
    (rare there).
    """
    total = comb(n, size, exact=False) / (2 if halve else 1)
    if total <= _ENUMERATED_STRATUM:
        sides = np.array(list(itertools.combinations(range(n), size)))
        if halve:
            sides = sides[sides[:, 0] == 0]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(label, size)))
        masks = np.zeros((len(sides), n), bool)
        masks[np.arange(len(sides))[:, None], sides] = True
        yield from masks[rng.permutation(len(masks))]
        return
    seen: set[bytes] = set()
    for _, rng in _blocks(seed, label, size):
        masks = np.empty((_STRATUM_BLOCK, n), bool)
        order = rng.permuted(np.broadcast_to(np.arange(n), (_STRATUM_BLOCK, n)), axis=1)
        masks[np.arange(_STRATUM_BLOCK)[:, None], order] = np.arange(n) < size
        if halve:
            masks[~masks[:, 0]] = ~masks[~masks[:, 0]]
        for mask, key in zip(masks, np.packbits(masks, axis=1), strict=True):
            key = key.tobytes()
            if key not in seen:
                seen.add(key)
                yield mask


def permutation_draws(ids: list[str], seed: int) -> Iterator[_Draws]:
    """Antithetic draws: each random permutation's chain of prefixes, then the chain of its reverse."""
    n = len(ids)
    yield _bounds(n)
    position = np.tile(np.arange(n + 1), 2)
    for block, rng in _blocks(seed, _STREAM):
        for offset, order in enumerate(_permutations(rng, n)):
            rank = np.empty(n, np.int64)
            rank[order] = np.arange(n)
            index = np.full(2 * (n + 1), block * _BLOCK + offset)
            forward = rank[None, :] < np.arange(n + 1)[:, None]  # row s: the first s contributors of the order
            backward = rank[None, :] >= n - np.arange(n + 1)[:, None]  # the first s of the reversed order
            yield _Draws(
                np.vstack([forward, backward]), index, {"permutation": index, "position": position}, sample=True
            )


def _collect(
    ids: list[str], estimator: str, budget: int | None, names: Sequence[str], blocks: Iterator[_Draws]
) -> pd.DataFrame:
    """Take the new member sets of the draws in order until ``budget`` rows (None: all); record complete samples."""
    index_of: dict[bytes, int] = {}
    taken: list[tuple[_Draws, list[int]]] = []
    samples: dict[int, str] = {}
    pending: list[str] = []  # complete draws that needed no new row wait for the next one
    used: list[int] = []
    added, idle, full = False, 0, False
    for block in blocks:
        packed = np.packbits(block.masks, axis=1)
        keys = packed.view(f"V{packed.shape[1]}").ravel().tolist()
        ends = np.append(block.draw[1:] != block.draw[:-1], True).tolist()
        new: list[int] = []
        taken.append((block, new))
        for position, (key, end) in enumerate(zip(keys, ends, strict=True)):
            row = index_of.get(key)
            if row is None:
                if len(index_of) == budget:  # the budget ends inside this draw: it is not complete
                    full = True
                    break
                row = index_of[key] = len(index_of)
                new.append(position)
                added = True
            used.append(row)
            if not end:
                continue
            if block.sample:
                pending.append(",".join(map(coalition_id, used)))
            idle = 0 if added else idle + 1
            if added and pending:
                samples[len(index_of) - 1] = ";".join(pending)
                pending = []
            used, added = [], False
            if len(index_of) == budget:
                full = True
                break
            if budget is not None and idle > _MAX_DRAWS_PER_ROW * budget:
                raise ValueError(
                    f"found only {len(index_of)} distinct coalitions for budget {budget} after {idle} draws "
                    f"without a new one: almost every coalition of {len(ids)} contributors is planned; "
                    "use --estimator exact"
                )
        if full:
            break
    columns: dict[str, object] = {}
    for name in names:
        if name == "samples":
            columns[name] = [samples.get(row, "") for row in range(len(index_of))]
        else:
            parts = [b.columns.get(name, np.full(len(b.draw), np.nan))[rows] for b, rows in taken]
            columns[name] = np.concatenate(parts)
    return _table(ids, estimator, np.concatenate([b.masks[rows] for b, rows in taken]), columns)


def _table(ids: list[str], estimator: str, masks: np.ndarray, columns: dict[str, object]) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "coalition": [coalition_id(r) for r in range(len(masks))],
            "members": _members_text(ids, masks),
            "estimator": estimator,
        }
    )
    for name, values in columns.items():
        table[name] = pd.array(values, dtype="Int64") if name in _INTEGER_COLUMNS else values
    return table


def _members_text(ids: list[str], masks: np.ndarray) -> list[str]:
    """Join the member ids of each mask with commas, by byte masks over one buffer of all ids (ids are ASCII)."""
    encoded = [f"{name},".encode() for name in ids]
    width = np.array([len(word) for word in encoded])
    buffer = np.frombuffer(b"".join(encoded), np.uint8)
    texts: list[str] = []
    for start in range(0, len(masks), _TEXT_ROWS):
        keep = np.repeat(masks[start : start + _TEXT_ROWS], width, axis=1)
        text = np.broadcast_to(buffer, keep.shape)[keep].tobytes().decode("ascii")
        ends = np.cumsum(keep.sum(axis=1)).tolist()
        texts += [
            text[begin:end][:-1] for begin, end in zip([0, *ends[:-1]], ends, strict=True)
        ]  # [:-1]: the last comma
    return texts


def write_coalitions(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a plan as TSV, atomically."""
    write_table(table, path)


def read_coalitions(path: str | os.PathLike[str], contributors: Sequence[str] | None = None) -> pd.DataFrame:
    """Read and validate a coalition table (see :func:`parse_coalitions`); cells come back as strings."""
    return parse_coalitions(_read_tsv(path), contributors, source=str(path))[0]


def require_columns(table: pd.DataFrame, names: Sequence[str], source: str) -> None:
    """Raise naming the columns of `names` that `table` (read from `source`) lacks, and the ones it has."""
    missing = [name for name in names if name not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; columns are {list(table.columns)}")


def parse_coalitions(
    table: pd.DataFrame, contributors: Sequence[str] | None = None, source: str = "coalitions"
) -> tuple[pd.DataFrame, list[str], sparse.csr_array]:
    """Validate a coalition table and return it, the contributors and the 0-1 membership matrix.

    Checks the ``coalition`` and ``members`` columns, that ids are path parts and unique, that every member is a
    valid (and, given ``contributors``, known) id listed once per row; errors name the row (row 1 is the first
    below the header). Without ``contributors`` they are taken from the table in the contributors file's order:
    the grand coalition lists them so; without it (banzhaf) the order is merged from the rows, each of which keeps
    it. Contributors in no coalition cannot be known that way: pass ``contributors`` to include them.
    """
    require_columns(table, ("coalition", "members"), source)
    if table.empty:
        raise ValueError(f"{source}: no coalitions")
    table = table.reset_index(drop=True)
    for name in ("coalition", "members", "estimator"):
        if name in table.columns:
            table[name] = table[name].fillna("").astype(str)
    ids = table["coalition"]
    bad = ~ids.str.fullmatch(COALITION_ID.pattern)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source} row {row + 1}: invalid coalition id {ids[row]!r}; ids are path parts like c000042 "
            "(letters, digits, '_' and '-')"
        )
    repeated = ids.duplicated()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        first = int(np.flatnonzero(ids == ids[row])[0])
        raise ValueError(f"{source} row {row + 1}: duplicate coalition id {ids[row]!r} (also row {first + 1})")

    text = table["members"]
    counts = np.where(text == "", 0, text.str.count(",") + 1)
    flat = ",".join(text[counts > 0]).split(",") if counts.any() else []
    row_of = np.repeat(np.arange(len(table)), counts)
    codes, found = pd.factorize(np.array(flat, dtype=object))
    first = np.unique(codes, return_index=True)[1]  # factorize numbers names by first appearance
    where = [f"{source} row {row_of[k] + 1}, coalition {ids[row_of[k]]}" for k in first]
    for name, place in zip(found, where, strict=True):
        validate_contributor_id(name, where=place)
    keys = np.sort(row_of * len(found) + codes)
    twice = keys[1:][keys[1:] == keys[:-1]]
    if len(twice):
        row = int(twice[0] // len(found))
        raise ValueError(f"{source} row {row + 1}: coalition {ids[row]} lists {found[twice[0] % len(found)]!r} twice")
    if contributors is None:
        names = _member_order(found, codes, row_of, counts)
    else:
        names = list(contributors)
        _refuse_duplicates(names, "duplicate contributor")
        unknown = np.flatnonzero(~pd.Index(found).isin(names))
        if len(unknown):
            raise ValueError(
                f"{where[unknown[0]]}: unknown contributor {found[unknown[0]]!r}; it is not in the contributors file"
            )
    column = pd.Index(names).get_indexer(found)
    matrix = sparse.csr_array((np.ones(len(codes), bool), (row_of, column[codes])), shape=(len(table), len(names)))
    matrix.sort_indices()
    return table, names, matrix


def _member_order(found: np.ndarray, codes: np.ndarray, row_of: np.ndarray, counts: np.ndarray) -> list[str]:
    """The contributors' order: the grand coalition's, else the order merged from consecutive members of rows."""
    grand = np.flatnonzero(counts == len(found))
    if len(grand):
        return found[codes[row_of == grand[0]]].tolist()
    follows = row_of[1:] == row_of[:-1]
    pairs = np.unique(codes[:-1][follows] * len(found) + codes[1:][follows])  # (earlier, later) as one integer
    before: dict[int, set[int]] = {code: set() for code in range(len(found))}
    for earlier, later in zip(*np.divmod(pairs, len(found)), strict=True):
        before[int(later)].add(int(earlier))
    try:
        return found[list(graphlib.TopologicalSorter(before).static_order())].tolist()
    except graphlib.CycleError:  # rows disagree on the order: keep the order of first appearance
        return found.tolist()


def parse_plan(
    table: pd.DataFrame, contributors: Sequence[str] | None = None, source: str = "coalitions"
) -> tuple[pd.DataFrame, list[str], sparse.csr_array]:
    """:func:`parse_coalitions` for a plan of :func:`plan`: one known estimator, its columns, distinct sets."""
    table, names, matrix = parse_coalitions(table, contributors, source)
    from diffcredit.estimators import NAMES, REGISTRY  # the registry refers to this module's planners

    if "estimator" not in table.columns:
        raise ValueError(f"{source}: no 'estimator' column; aggregate a plan written by diffcredit plan")
    estimators = table["estimator"].unique()
    if len(estimators) != 1 or estimators[0] not in REGISTRY:
        raise ValueError(
            f"{source}: column 'estimator' must hold one of {', '.join(NAMES)} on every row, found {sorted(estimators)}"
        )
    for name in REGISTRY[estimators[0]].columns:
        if name not in table.columns:
            raise ValueError(f"{source}: the {estimators[0]} plan needs a {name!r} column; re-run diffcredit plan")
    sets = pd.Series(
        [matrix.indices[a:b].tobytes() for a, b in zip(matrix.indptr[:-1], matrix.indptr[1:], strict=True)]
    )
    same = sets.duplicated()
    if same.any():
        row = int(np.flatnonzero(same)[0])
        first = int(np.flatnonzero(sets == sets[row])[0])
        raise ValueError(
            f"{source} row {row + 1}: coalition {table['coalition'][row]} has the same members as "
            f"{table['coalition'][first]} (row {first + 1}); a plan lists each coalition once"
        )
    return table, names, matrix


def member_sets(table: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """Map each coalition id to its member ids."""
    return {c: tuple(m.split(",")) if m else () for c, m in zip(table["coalition"], table["members"], strict=True)}


def _read_tsv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a TSV as strings (an empty cell stays ``""``), refusing empty files."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file; expected a header line and at least one row") from None
    if table.empty:
        raise ValueError(f"{path}: no rows under the header")
    return table


def _refuse_duplicates(values: Sequence[str], message: str) -> None:
    seen: set[str] = set()
    for position, value in enumerate(values):
        if value in seen:
            raise ValueError(f"{message} {value!r} at row {position + 1}; every id must be unique")
        seen.add(value)
