"""The ``diffcredit`` command: the plan/aggregate file contract, error reporting, start-up imports, verify, demo."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from games import pairwise, reference_shapley, utilities

from diffcredit.bundle import make_bundle
from diffcredit.cli import main
from diffcredit.coalitions import read_coalitions
from diffcredit.shapley import aggregate

GAME = pairwise(5, seed=0)


@pytest.fixture
def contributors(tmp_path: Path) -> Path:
    path = tmp_path / "contributors.tsv"
    pd.DataFrame({"contributor": GAME.players, "n_items": 10}).to_csv(path, sep="\t", index=False)
    return path


def plan_and_measure(tmp_path: Path, contributors: Path, estimator: str, budget: int = 20) -> tuple[Path, Path]:
    plan = tmp_path / "coalitions.tsv"
    assert (
        main(
            [
                "plan",
                "--contributors",
                str(contributors),
                "--estimator",
                estimator,
                "--budget",
                str(budget),
                "--seed",
                "3",
                "--out",
                str(plan),
            ]
        )
        == 0
    )
    rows = utilities(read_coalitions(plan), GAME, seeds=2, noise=0.1)
    rows.to_csv(tmp_path / "utilities.tsv", sep="\t", index=False)
    return plan, tmp_path / "utilities.tsv"


def test_plan_then_aggregate_exact(tmp_path: Path, contributors: Path):
    plan, measured = plan_and_measure(tmp_path, contributors, "exact")
    out = tmp_path / "values.csv"
    assert (
        main(
            [
                "aggregate",
                "--coalitions",
                str(plan),
                "--utilities",
                str(measured),
                "--out",
                str(out),
                "--convergence",
                str(tmp_path / "convergence.csv"),
            ]
        )
        == 0
    )
    values = pd.read_csv(out)
    assert list(values.columns[:5]) == ["contributor", "value", "stderr", "ci_low", "ci_high"]
    assert values["contributor"].tolist() == GAME.players
    assert set(values["estimator"]) == {"exact"}
    truth = reference_shapley(GAME, GAME.players)
    assert ((values["ci_low"] <= truth) & (truth <= values["ci_high"])).mean() >= 0.8
    assert (tmp_path / "convergence.csv").exists()


@pytest.mark.parametrize("estimator", ["permutation", "kernelshap", "kernelshap_unpaired", "banzhaf", "loo"])
def test_aggregate_uses_the_estimator_recorded_in_the_plan(tmp_path: Path, contributors: Path, estimator):
    plan, measured = plan_and_measure(tmp_path, contributors, estimator)
    out = tmp_path / "values.csv"
    assert (
        main(
            [
                "aggregate",
                "--coalitions",
                str(plan),
                "--utilities",
                str(measured),
                "--out",
                str(out),
                "--confidence",
                "0.9",
            ]
        )
        == 0
    )
    expected = aggregate(read_coalitions(plan), pd.read_csv(measured, sep="\t"), confidence=0.9).table
    pd.testing.assert_frame_equal(pd.read_csv(out), expected, check_dtype=False)


def test_missing_utilities_exit_2_unless_excluded(tmp_path: Path, contributors: Path, capsys):
    plan, measured = plan_and_measure(tmp_path, contributors, "kernelshap")
    rows = pd.read_csv(measured, sep="\t")
    rows.loc[rows["coalition"] == "c000005", "utility"] = np.nan
    rows.to_csv(measured, sep="\t", index=False)
    arguments = [
        "aggregate",
        "--coalitions",
        str(plan),
        "--utilities",
        str(measured),
        "--out",
        str(tmp_path / "values.csv"),
    ]
    with pytest.raises(SystemExit) as stop:
        main(arguments)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("diffcredit: error: 1 coalition(s) without a finite utility: c000005 (NaN)")
    assert "Traceback" not in error
    assert main([*arguments, "--missing", "exclude"]) == 0
    assert "excluded 1 coalition(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("p3", "p9"), "row 1, coalition c000000: unknown contributor 'p9'; it is not in"),
        (lambda text: text.replace("c000002", "c000001"), "row 3: duplicate coalition id 'c000001'"),
        (lambda text: text.splitlines()[0] + "\n", "no rows under the header"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path: Path, contributors: Path, edit, message):
    plan, measured = plan_and_measure(tmp_path, contributors, "loo")
    plan.write_text(edit(plan.read_text()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffcredit",
            "aggregate",
            "--coalitions",
            str(plan),
            "--utilities",
            str(measured),
            "--out",
            str(tmp_path / "out.csv"),
            "--contributors",
            str(contributors),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("diffcredit: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_plan_refuses_bad_contributor_ids(tmp_path: Path, capsys):
    path = tmp_path / "contributors.tsv"
    path.write_text("contributor\nalice\nbob smith\n")
    with pytest.raises(SystemExit) as stop:
        main(["plan", "--contributors", str(path), "--estimator", "loo", "--out", str(tmp_path / "p.tsv")])
    assert stop.value.code == 2
    assert "invalid contributor id 'bob smith'" in capsys.readouterr().err
    assert not (tmp_path / "p.tsv").exists()


def test_plan_and_aggregate_do_not_import_torch(tmp_path: Path, contributors: Path):
    plan, measured = tmp_path / "coalitions.tsv", tmp_path / "utilities.tsv"
    script = f"""
import sys
import diffcredit.cli
assert diffcredit.cli.main(["plan", "--contributors", {str(contributors)!r}, "--estimator", "kernelshap",
                            "--budget", "12", "--seed", "0", "--out", {str(plan)!r}]) == 0
import pandas as pd
table = pd.read_csv({str(plan)!r}, sep="\\t")
pd.DataFrame({{"coalition": table["coalition"], "utility": range(len(table))}}).to_csv(
    {str(measured)!r}, sep="\\t", index=False)
assert diffcredit.cli.main(["aggregate", "--coalitions", {str(plan)!r}, "--utilities", {str(measured)!r},
                            "--out", {str(tmp_path / "s.csv")!r}]) == 0
heavy = sorted(name for name in ("torch", "diffusers", "snakemake") if name in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "s.csv")) == len(GAME.players)


def test_module_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "diffcredit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("plan", "aggregate", "demo", "verify"))
    result = subprocess.run([sys.executable, "-m", "diffcredit", "plan", "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "diffcredit plan: error: the following arguments are required" in result.stderr


def test_verify_reports_ok_or_the_problems(tmp_path: Path, capsys):
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "b.tsv").write_text("y\n2\n")
    bundle = tmp_path / "bundle"
    make_bundle({"a.csv": tmp_path / "a.csv", "b.tsv": tmp_path / "b.tsv"}, bundle)
    assert main(["verify", str(bundle)]) == 0
    assert capsys.readouterr().out == "ok: 2 files verified\n"
    sums = bundle / "SHA256SUMS"
    sums.write_text(sums.read_text().replace(sums.read_text()[:8], "00000000", 1))
    assert main(["verify", str(bundle)]) == 1
    assert "a.csv: checksum differs" in capsys.readouterr().out
    (bundle / "results.tar.gz").write_bytes(b"not a tar file")
    assert main(["verify", str(bundle)]) == 1
    assert "results.tar.gz" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["verify", str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and "diffcredit: error: " in capsys.readouterr().err


def test_demo_forwards_every_argument(monkeypatch):
    received = []
    monkeypatch.setitem(sys.modules, "diffcredit.demo", types.SimpleNamespace(main=received.append))
    assert main(["demo", "--out", "x", "--steps", "3", "--help"]) == 0
    assert received == [["--out", "x", "--steps", "3", "--help"]]


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffcredit {version('diffcredit')}"


def test_help_shows_each_option_default(capsys):
    with pytest.raises(SystemExit):
        main(["aggregate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.95)" in text and "(default: error)" in text
