"""The pages of `snakemake --report`: the values with their intervals, the cost of every stage, the configuration.

Each is a self-contained HTML page (the report shows HTML inline; it only offers CSV and TSV files for download).
The costs come from the benchmark files Snakemake writes for every job (wall seconds, CPU seconds, peak memory).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from diffcredit.io import write_text

# A wildcard, `{name}` or `{name,constraint}` (the constraint may hold one level of braces, as in b\d{5}).
_WILDCARD = re.compile(r"\{([^{},]+)(?:,((?:[^{}]|\{[^{}]*\})*))?\}")
_STYLE = (
    "body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
    "td:first-child,th:first-child{text-align:left}.warning{color:#a00000}"
)


def stage_costs(patterns: Mapping[str, str], root: str | os.PathLike[str] = ".") -> pd.DataFrame:
    """Jobs, wall and CPU seconds and peak memory per rule, from the benchmark files under `root`.

    `patterns` maps each rule to its benchmark file pattern (a ``{wildcard}`` matches its constraint, else one path
    part). A file that matches several patterns belongs to the most specific one, the pattern with the most literal
    characters.
    """
    matchers = {rule: (_regex(pattern), len(_WILDCARD.sub("", pattern))) for rule, pattern in patterns.items()}
    folders = {Path(root, _WILDCARD.split(pattern, maxsplit=1)[0]).parent for pattern in patterns.values()}
    found = sorted({path for folder in folders if folder.is_dir() for path in folder.rglob("*.tsv")})
    rows = []
    for path in found:
        relative = path.relative_to(root).as_posix()
        owners = [(literal, rule) for rule, (regex, literal) in matchers.items() if regex.fullmatch(relative)]
        if not owners:
            continue
        bench = pd.read_csv(path, sep="\t").iloc[0]
        rows.append(
            {
                "stage": max(owners)[1],
                "s": bench["s"],
                "cpu_time": bench.get("cpu_time"),
                "max_rss": bench.get("max_rss"),
            }
        )
    table = pd.DataFrame(rows, columns=["stage", "s", "cpu_time", "max_rss"])
    for column in ("s", "cpu_time", "max_rss"):
        table[column] = pd.to_numeric(table[column], errors="coerce")  # "NA" for jobs too short to sample
    costs = table.groupby("stage").agg(
        jobs=("s", "size"),
        wall_s=("s", "sum"),
        mean_wall_s=("s", "mean"),
        max_wall_s=("s", "max"),
        cpu_s=("cpu_time", "sum"),
        peak_rss_mb=("max_rss", "max"),
    )
    return costs.sort_values("wall_s", ascending=False).reset_index()


def _regex(pattern: str) -> re.Pattern:
    parts, end = [], 0
    for wildcard in _WILDCARD.finditer(pattern):
        parts += [re.escape(pattern[end : wildcard.start()]), f"(?:{wildcard.group(2) or '[^/]+'})"]
        end = wildcard.end()
    return re.compile("".join([*parts, re.escape(pattern[end:])]))


def costs_page(patterns: Mapping[str, str], out: str | os.PathLike[str], root: str | os.PathLike[str] = ".") -> None:
    """:func:`stage_costs` as an HTML page, with the total."""
    costs = stage_costs(patterns, root)
    total = costs[["jobs", "wall_s", "cpu_s"]].sum()
    summary = (
        f"{int(total['jobs'])} jobs, {total['wall_s']:.1f} s of wall time and {total['cpu_s']:.1f} s of CPU "
        "time in all (each job's own benchmark; jobs that ran in parallel overlap in time)."
    )
    _write_page(out, "Cost per stage", summary, costs.round(2))


def values_page(
    values: str | os.PathLike[str],
    rounds: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    estimator: str,
    kind: str,
    confidence: float,
    reference: str | os.PathLike[str] | None = None,
) -> None:
    """The values table (highest first) with its intervals, and each round's coalitions and stopping decision.

    With `reference`, the run's prepared reference folder, the page opens with the yardstick the values were measured
    by (:func:`diffcredit.properties.reference_provenance`): the trusted reference's source, path and digest, or a
    warning that the contributors shape their own yardstick.
    """
    table = pd.read_csv(values).sort_values("rank", kind="stable")
    shown = [c for c in ("rank", "contributor", "value", "stderr", "ci_low", "ci_high", "n_coalitions") if c in table]
    per_round = pd.read_csv(rounds, sep="\t").drop_duplicates("round")[["round", "n_coalitions", "stop", "reason"]]
    summary = (
        f"{kind} values ({estimator}) with {confidence:.0%} intervals [ci_low, ci_high], from "
        f"{int(per_round['n_coalitions'].iloc[-1])} coalitions in {len(per_round)} round(s)."
    )
    if kind == "Shapley":
        summary += f" They sum to v(N) − v(∅) = {table['value'].sum():.6g}."
    if reference is None:
        _write_page(out, f"{kind} values", summary, table[shown], ("Rounds", per_round))
        return
    from diffcredit.properties import reference_provenance

    provenance = reference_provenance(reference)
    source = provenance["source"] or {}
    details = pd.DataFrame(
        {
            "yardstick": [provenance["yardstick"]],
            **{key: [source.get(key)] for key in ("source", "path", "manifest")},
            "images": [provenance["n_reference"]],
            "digest": [provenance["reference_digest"]],
            "extractor fitted on": [provenance["extractor_fit"]],
        }
    )
    notice = (provenance["statement"], not provenance["trusted"])
    _write_page(
        out, f"{kind} values", summary, table[shown], ("Yardstick", details), ("Rounds", per_round), notice=notice
    )


def config_page(config: Mapping, out: str | os.PathLike[str]) -> None:
    """The run's configuration as validated, defaults filled in, as YAML on an HTML page."""
    import yaml

    text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
    summary = "The configuration this run used, with the schema's defaults filled in (config/README.md explains keys)."
    body = f"<h2>Configuration</h2>\n<p>{html.escape(summary)}</p>\n<pre>{html.escape(text)}</pre>"
    write_text(out, _page("Configuration", body))


def _write_page(
    out,
    title: str,
    summary: str,
    table: pd.DataFrame,
    *more: tuple[str, pd.DataFrame],
    notice: tuple[str, bool] | None = None,
) -> None:
    """`notice`: (a sentence shown above the table, whether it is a warning)."""
    parts = [f"<h2>{html.escape(title)}</h2>"]
    if notice is not None:
        text, warning = notice
        text = html.escape(text)
        parts.append(f"<p class='warning'><strong>{text}</strong></p>" if warning else f"<p>{text}</p>")
    parts += [f"<p>{html.escape(summary)}</p>", table.to_html(index=False)]
    for heading, extra in more:
        parts += [f"<h3>{html.escape(heading)}</h3>", extra.to_html(index=False)]
    write_text(out, _page(title, "\n".join(parts)))


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )
