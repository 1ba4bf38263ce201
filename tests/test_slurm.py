"""The cluster path against a real SLURM: `snakemake --profile slurm` on the local single-node cluster of
scripts/slurm-local.sh, checked against a local run of the same tiny config, with faults injected.

Each run happens in a fresh copy of the workflow files (as a clone would have them, `slurm` link included) inside a
temporary folder. SLURM's accounting (`sacct`) is the witness of what ran where: every job's submit line, state and
allocated resources. A run that outlives its time limit is killed with SIGKILL (Snakemake ignores SIGTERM while
cluster jobs look active); its SLURM jobs are then cancelled and the cluster's daemons stopped by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pytest
import yaml
from workflow_files import continued, fail_once, stored_records, workflow_copy

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
TEST_PROFILE = ROOT / "tests" / "slurm" / "config.yaml"
PROFILES = ("--profile", "slurm", "--profile", "tests/slurm")
GPU_RULES = {"train_full", "prune", "recover", "coalition_utilities"}
RUN = Path("results/tiny")
SHAPLEY = RUN / "sft" / "kernelshap" / "values.csv"
UTILITIES = RUN / "sft" / "kernelshap" / "utilities.tsv"
RUN_TIMEOUT = 900  # seconds for one Snakemake run (the tiny config takes 3-5 minutes on the cluster)
T = TypeVar("T")
PACKAGED_COMMANDS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch")


@dataclass(frozen=True)
class SlurmJob:
    """One SLURM job as accounting recorded it."""

    id: str
    state: str
    rule: str
    wildcards: str
    attempt: int
    allocated: str
    submit_line: str


def cluster_copy(path: Path) -> Path:
    """The files a clone has, and the test profile, copied into `path`."""
    workflow_copy(path)
    (path / "tests" / "slurm").mkdir(parents=True)
    shutil.copy(TEST_PROFILE, path / "tests" / "slurm")
    return path


def slurm_jobs(workdir: Path) -> list[SlurmJob]:
    """The SLURM jobs whose working directory is `workdir`, in submission order."""
    listing = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-S", "now-1days", "-o", "JobID,State,WorkDir,AllocTRES,SubmitLine"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = []
    for line in listing.splitlines():
        job_id, state, job_dir, allocated, submit_line = line.split("|", 4)
        if Path(job_dir) != workdir:
            continue
        rule, wildcards = re.search(r"--target-jobs '(\w+):([^']*)'", submit_line).groups()
        attempt = int(re.search(r"--attempt (\d+)", submit_line).group(1))
        jobs.append(SlurmJob(job_id, state.split()[0], rule, wildcards, attempt, allocated, submit_line))
    return sorted(jobs, key=lambda job: int(job.id))


def cancel_jobs(workdir: Path) -> None:
    """scancel every queued or running job of `workdir`, as a user does after killing Snakemake."""
    queue = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, check=True).stdout
    ids = [
        job_id for job_id, job_dir in (line.split(" ", 1) for line in queue.splitlines()) if Path(job_dir) == workdir
    ]
    if ids:
        subprocess.run(["scancel", *ids], check=True)


def planned_jobs(output: str) -> Counter[str]:
    """Job counts per rule from the table Snakemake prints before it starts."""
    table = output[output.index("Job stats:") :].splitlines()[3:]
    rows = [line.split() for line in table[: next(i for i, line in enumerate(table) if not line.strip())]]
    return Counter({rule: int(count) for rule, count in rows if rule != "total"})


class Run:
    """Snakemake running in its own session in `workdir`, its output in `workdir`/snakemake.log."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir, self.log = workdir, workdir / "snakemake.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "snakemake", *args],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.deadline = time.monotonic() + RUN_TIMEOUT

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition: Callable[[], T], what: str) -> T:
        """Poll `condition` while the run goes on and return its first true value; fail if the run ends first or the
        time is up."""
        while not (value := condition()):
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > self.deadline:
                self.abort(f"waiting for {what}")
            time.sleep(0.5)
        return value

    def finish(self) -> str:
        """Wait for the run to succeed and return its output."""
        try:
            self.process.wait(timeout=max(self.deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            self.abort("waiting for the run to finish")
        if self.process.returncode != 0:
            raise AssertionError(f"snakemake failed ({self.process.returncode}):\n{self.output()[-6000:]}")
        return self.output()

    def kill(self) -> None:
        """SIGKILL Snakemake (and its children), then cancel its SLURM jobs: an interrupted run, cleaned up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        cancel_jobs(self.workdir)

    def abort(self, doing: str) -> None:
        self.kill()
        subprocess.run([SCRIPT, "down"], check=False)
        pytest.fail(
            f"timed out after {RUN_TIMEOUT} s {doing}; cancelled the jobs and stopped the cluster:\n"
            f"{self.output()[-4000:]}"
        )


def start_cluster_run(workdir: Path, *args: str, budget: int | None = None) -> Run:
    """The tiny config on the cluster, with a larger KernelSHAP `budget` if given (it keeps the plan's coalitions and
    adds jobs of new ones). `args` come first: targets must precede `--configfile`, which takes several values."""
    configfiles = [str(TINY)]
    if budget is not None:
        overlay = workdir / f"budget-{budget}.yaml"
        overlay.write_text(yaml.safe_dump({"estimator": {"name": "kernelshap", "budget": budget}}))
        configfiles.append(str(overlay))
    return Run(workdir, *args, *PROFILES, "--configfile", *configfiles)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The local cluster, up with the test profile's partition and account; stopped afterwards unless it was up.
    Yields the environment for scripts/slurm-local.sh."""
    resources = yaml.safe_load(TEST_PROFILE.read_text())["default-resources"]
    env = {
        **os.environ,
        "DIFFCREDIT_SLURM_PARTITION": resources["slurm_partition"],
        "DIFFCREDIT_SLURM_ACCOUNT": resources["slurm_account"],
    }
    was_up = subprocess.run([SCRIPT, "status"], capture_output=True, env=env).returncode == 0
    up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, env=env, timeout=900)
    if up.returncode != 0:
        missing = [command for command in PACKAGED_COMMANDS if shutil.which(command) is None]
        if missing:
            pytest.skip(
                f"the SLURM Debian packages are not installed and could not be ({', '.join(missing)} "
                f"missing): {up.stderr.strip()}"
            )
        pytest.fail(f"scripts/slurm-local.sh up failed:\n{up.stderr}")
    yield env
    if not was_up:
        subprocess.run([SCRIPT, "down"], check=True, env=env)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The tiny config run locally up to its Shapley values: the reference the cluster run must reproduce."""
    workdir = cluster_copy(tmp_path_factory.mktemp("local"))
    Run(workdir, str(SHAPLEY), "--cores", "2", "--configfile", str(TINY)).finish()
    return workdir


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory) -> tuple[Path, str]:
    """The tiny config on the cluster, whose first coalition job fails once (injected, before any work)."""
    workdir = cluster_copy(tmp_path_factory.mktemp("cluster"))
    fail_once(workdir, "coalition_utilities", workdir / "failed-once")
    output = start_cluster_run(workdir).finish()
    return workdir, output


def test_local_cluster_comes_up_idempotently(cluster):
    again = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, env=cluster, check=True)
    assert "already up" in again.stderr
    status = subprocess.run([SCRIPT, "status"], capture_output=True, text=True, env=cluster)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "gpu:standin:2" in status.stdout


def test_user_profile_holds_nothing_of_the_test_cluster():
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    local_only = set(yaml.safe_load(TEST_PROFILE.read_text()))
    assert not local_only & set(profile), (
        f"test-cluster settings leak into the user profile: {local_only & set(profile)}"
    )


def test_every_job_went_through_sbatch(cluster_run):
    workdir, output = cluster_run
    jobs = slurm_jobs(workdir)
    assert set(re.findall(r"submitted with SLURM jobid (\d+)", output)) == {job.id for job in jobs}
    completed = Counter(job.rule for job in jobs if job.state == "COMPLETED")
    assert completed == planned_jobs(output) - Counter(all=1), "every job but `all` must have run as a SLURM job"
    batches = sorted(path.stem for path in (workdir / RUN / "sft" / "kernelshap" / "batches").glob("*"))
    assert batches == ["b00000", "b00001"]
    for batch in batches:
        assert any(job.wildcards.endswith(f"batch={batch}") and job.state == "COMPLETED" for job in jobs)
    logs = workdir / ".snakemake" / "slurm_logs"
    for job in jobs:  # the test profile keeps the SLURM log of every job
        assert list(logs.rglob(f"{job.id}.log")), f"no SLURM log of job {job.id} ({job.rule})"


def test_gpu_rules_requested_and_got_a_gpu(cluster_run):
    jobs = slurm_jobs(cluster_run[0])
    assert {job.rule for job in jobs} >= GPU_RULES
    for job in jobs:
        wants_gpu = job.rule in GPU_RULES
        assert ("--gpus=1" in job.submit_line) == wants_gpu, job.submit_line
        assert ("gres/gpu=1" in job.allocated) == wants_gpu, f"job {job.id} ({job.rule}) was allocated {job.allocated}"
        assert " -A diffcredit -p debug " in job.submit_line, "the test profile's account and partition were not used"


def test_cluster_values_equal_the_local_run(cluster_run, local_run):
    # Same seeds, same thread counts (cpus-per-task is the rule's threads), CPU only: bit-identical.
    assert (cluster_run[0] / SHAPLEY).read_bytes() == (local_run / SHAPLEY).read_bytes()


def test_injected_failure_is_retried(cluster_run):
    workdir, _ = cluster_run
    assert (workdir / "failed-once").exists(), "the injected failure did not reach the coalition job"
    jobs = slurm_jobs(workdir)
    failed = [job for job in jobs if job.state != "COMPLETED"]
    assert [(job.rule, job.state, job.attempt) for job in failed] == [("coalition_utilities", "FAILED", 1)]
    retries = [(job.state, job.attempt) for job in jobs if job.wildcards == failed[0].wildcards and job != failed[0]]
    assert retries == [("COMPLETED", 2)]


def test_scancelled_job_is_detected_and_rerun(cluster_run, tmp_path):
    workdir = continued(cluster_run[0], tmp_path / "run")
    # Plugin 2.8.0 reads sacct's "CANCELLED by <uid>" as still running and waits forever; squeue says "CANCELLED".
    run = start_cluster_run(workdir, str(UTILITIES), "--slurm-status-command", "squeue", budget=12)
    new_batch = "mode=sft,plan=kernelshap,batch=b00002"  # the job the larger budget adds

    def running() -> SlurmJob | None:
        return next((job for job in slurm_jobs(workdir) if job.wildcards == new_batch and job.state == "RUNNING"), None)

    victim = run.wait_until(running, "the new coalition job ran")
    subprocess.run(["scancel", victim.id], check=True)
    run.finish()
    assert [(job.state, job.attempt) for job in slurm_jobs(workdir) if job.wildcards == new_batch] == [
        ("CANCELLED", 1),
        ("COMPLETED", 2),
    ]
    measured = pd.read_csv(workdir / UTILITIES, sep="\t")
    assert measured["coalition"].nunique() == 12 and len(measured) == 12 + 2  # ∅ and N are measured twice


def test_interrupted_run_restarts_without_recomputing(cluster_run, tmp_path):
    workdir = continued(cluster_run[0], tmp_path / "run")
    before = stored_records(workdir / RUN)
    run = start_cluster_run(workdir, str(UTILITIES), budget=16)  # adds the jobs b00002 and b00003
    run.wait_until(lambda: len(stored_records(workdir / RUN)) > len(before), "a new coalition was stored")
    run.kill()
    finished = stored_records(workdir / RUN)
    assert len(before) < len(finished) < len(before) + 8

    start_cluster_run(workdir, "--unlock", budget=16).finish()  # the killed run left its lock
    start_cluster_run(workdir, str(UTILITIES), budget=16).finish()
    after = stored_records(workdir / RUN)
    assert {path: after[path] for path in finished} == finished, "a finished coalition was recomputed"
    assert len(after) == len(before) + 8
    measured = pd.read_csv(workdir / UTILITIES, sep="\t")
    assert measured["coalition"].nunique() == 16 and len(measured) == 16 + 2  # ∅ and N are measured twice
