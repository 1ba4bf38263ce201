"""Encoded ensembles (Dai & Gifford 2023; "Ablation based counterfactuals", 2024): exact leave-one-contributor-out.

Each contributor gets a distinct binary code of length M with M/2 ones; ensemble member m is trained (from scratch)
on the contributors with a 1 at position m. The ensemble generates by averaging its members' noise predictions at
every denoising step, from a fixed noise sequence. Dropping every member that saw contributor i leaves an ensemble
trained without i (the M/2 members with a 0 at i), so with u the oriented property (higher is better)

    value_i = u(full ensemble) − u(ensemble of the members that did not see i),

is a leave-one-out value: positive when i's data improved the property (higher = more valuable). It also compares
an ensemble of M members with one of M/2, and averaging more members itself changes the generations (smoother noise
predictions). The size-matched in-versus-out contrast compares two ensembles of M/2 members each,

    contrast_i = u(members that saw i) − u(members that did not see i),

so ensemble size cancels. Arbitrary coalitions are out of reach: removing k contributors leaves about M·2⁻ᵏ members.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from diffcredit.attribution import save_values
from diffcredit.contributors import ContributorData, validate_contributor_id
from diffcredit.properties import Property, oriented
from diffcredit.seeds import derive_seed

MAX_DRAWS = 1000


def encode(contributors: Sequence[str], n_members: int, seed: int) -> pd.DataFrame:
    """Distinct codes with ``n_members / 2`` ones per contributor: rows = contributors, columns = members 0..M-1.

    Codes are drawn uniformly without replacement from all C(M, M/2) balanced codes, redrawn (seeded) until every
    member sees at least one contributor.
    """
    contributors = [validate_contributor_id(c) for c in contributors]
    if len(set(contributors)) != len(contributors):
        raise ValueError("contributor ids must be distinct; each one gets its own code")
    n = len(contributors)
    if n_members < 2 or n_members % 2:
        raise ValueError(f"n_members={n_members}: use an even number >= 2 (each code has n_members/2 ones)")
    n_codes = math.comb(n_members, n_members // 2)
    if n < 2 or n > n_codes:
        raise ValueError(
            f"{n} contributors cannot get distinct codes of {n_members} members with {n_members // 2} "
            f"ones: need 2 <= contributors <= C({n_members}, {n_members // 2}) = {n_codes}; "
            "use more members"
        )
    rng = np.random.default_rng(derive_seed(seed, "ensemble-codes"))
    for _ in range(MAX_DRAWS):
        ranks = rng.choice(n_codes, size=n, replace=False)
        codes = np.array([_unrank(int(r), n_members) for r in ranks])
        if codes.any(axis=0).all():
            return pd.DataFrame(codes, index=pd.Index(contributors, name="contributor"))
    raise ValueError(f"no draw of {n} codes over {n_members} members left every member with data; use fewer members")


def member_contributors(codes: pd.DataFrame, member: int) -> list[str]:
    """The contributors ensemble member `member` is trained on."""
    return list(codes.index[codes[member].astype(bool)])


def members_with(codes: pd.DataFrame, contributor: str) -> list[int]:
    """The members trained on `contributor`'s data."""
    return [int(m) for m in codes.columns[codes.loc[contributor].astype(bool)]]


def members_without(codes: pd.DataFrame, contributor: str) -> list[int]:
    """The members that never saw `contributor`: the ensemble left after ablating it."""
    return [int(m) for m in codes.columns[~codes.loc[contributor].astype(bool)]]


class AveragedEnsemble(nn.Module):
    """Members behind one model interface: the prediction is the mean of the members' predictions.

    Quacks like its members (``config``, ``forward(x, t, ...).sample``: a ``UNet2DModel``, or a LoRA-adapted
    ``UNet2DConditionModel`` given ``encoder_hidden_states``), so the ensemble samples through its family's seeded
    sampler, with the same noise, as any single model.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    @property
    def config(self):
        return self.members[0].config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *args, **kwargs):
        outputs = [member(sample, timestep, *args, **kwargs) for member in self.members]
        return type(outputs[0])(sample=torch.stack([output.sample for output in outputs]).mean(0))


def ablation_table(
    members: Sequence[nn.Module],
    codes: pd.DataFrame,
    prop: Property,
    *,
    generate: Callable[[nn.Module], np.ndarray],
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Ablation value of each contributor of `codes` (see the module docstring); `members[m]` is member m.

    `generate` makes the images of a model (an :class:`AveragedEnsemble`) from the same noise at every call. Returns a
    table indexed by contributor with ``value``, the size-matched ``contrast``, the oriented utilities behind them
    (``utility_full``, ``utility_ablated``, ``utility_with``) and ``members_left``.
    """
    if len(members) != codes.shape[1]:
        raise ValueError(f"{len(members)} members given but the codes have {codes.shape[1]} columns")

    def utility(chosen: Sequence[int]) -> float:
        return oriented(prop(generate(AveragedEnsemble([members[m] for m in chosen]))), prop.higher_is_better)

    full = utility(range(len(members)))
    rows = {}
    for contributor in codes.index:
        kept = members_without(codes, contributor)
        ablated, seen = utility(kept), utility(members_with(codes, contributor))
        rows[contributor] = {
            "value": full - ablated,
            "contrast": seen - ablated,
            "utility_full": full,
            "utility_ablated": ablated,
            "utility_with": seen,
            "members_left": len(kept),
        }
        log(f"ensemble without {contributor}: utility {ablated:.4g} (full {full:.4g})")
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("contributor")


def write_codes(*, contributors: str, n_members: int, seed: int, out: str) -> None:
    """The workflow's code stage: the contributors TSV in, ``codes.tsv`` (contributor x member, 0/1) out."""
    from diffcredit.io import write_atomic

    ids = pd.read_csv(contributors, sep="\t", dtype=str)["contributor"]
    codes = encode(list(ids), n_members, seed).astype(int)
    write_atomic(Path(out), lambda tmp: codes.to_csv(tmp, sep="\t"))


def read_codes(path: str | Path) -> pd.DataFrame:
    """The codes written by :func:`write_codes` (contributor x member, bool)."""
    codes = pd.read_csv(path, sep="\t", index_col="contributor", dtype={"contributor": str})
    codes.columns = codes.columns.astype(int)
    return codes.astype(bool)


def train_member(
    *,
    codes: str,
    member: int,
    train_data: str,
    out: str,
    seed: int,
    family: dict | None = None,
    unet: dict | None = None,
    schedule: dict | None = None,
    **training,
) -> None:
    """Train ensemble member `member` from scratch in the run's `family` (None: pixel, of `unet` and `schedule`) on its
    contributors' items, as the retraining of a coalition does (the text family: a LoRA from scratch), and save it.

    `training` goes to the family's fit (steps, batch_size, lr, ...).
    """
    from diffcredit.stages import model_family

    data = ContributorData.load(train_data)
    kind = model_family(data, family, unet=unet, schedule=schedule)
    model = kind.build(seed=derive_seed(seed, "ensemble-init", member))
    subset = data.subset(member_contributors(read_codes(codes), member))
    kind.fit(model, subset, seed=derive_seed(seed, "ensemble-train", member), **training)
    kind.save(model, out)


def write_values(
    *,
    codes: str,
    members: Sequence[str],
    train_data: str,
    reference: str,
    property: str,
    property_options: dict,
    out: str,
    contrast_out: str | None = None,
    seed: int,
    family: dict | None = None,
    schedule: dict | None = None,
    n_samples: int,
    log: Callable[[str], None] = print,
    **sampling,
) -> pd.DataFrame:
    """The workflow's ensemble stage: load the members, ablate each contributor, write values.csv (and the
    size-matched contrast's to `contrast_out`).

    `members` are the member model folders in member order, generated through the run's `family` (as for
    :func:`train_member`; `train_data` gives its image shape); `sampling` holds inference_steps and sampler. Noise
    is the run's generation noise, as for the coalitions.
    """
    from diffcredit.properties import load_property
    from diffcredit.stages import model_family

    kind = model_family(ContributorData.load(train_data), family, schedule=schedule)
    noise = derive_seed(seed, "generation-noise")
    tic = time.perf_counter()
    table = ablation_table(
        [kind.load(path) for path in members],
        read_codes(codes),
        load_property(property, reference, **property_options),
        generate=lambda model: kind.generate(model, n_samples, seed=noise, **sampling),
        log=log,
    )
    seconds = time.perf_counter() - tic
    log(f"ensemble ablations: {seconds:.1f} s")
    save_values(table["value"], Path(out), **table.drop(columns="value"), seconds=seconds)
    if contrast_out is not None:
        save_values(table["contrast"], Path(contrast_out), **table.drop(columns=["contrast", "value"]), seconds=seconds)
    return table


def _unrank(rank: int, n_members: int) -> np.ndarray:
    """The `rank`-th length-M 0/1 vector with M/2 ones (codes with a 1 first come first): a bijection from
    0..C(M, M/2)-1, the combinatorial number system."""
    code = np.zeros(n_members, dtype=bool)
    ones = n_members // 2
    for position in range(n_members):
        if ones == 0:
            break
        with_one = math.comb(n_members - position - 1, ones - 1)  # codes with a 1 here, given the prefix
        if rank < with_one:
            code[position] = True
            ones -= 1
        else:
            rank -= with_one
    return code
