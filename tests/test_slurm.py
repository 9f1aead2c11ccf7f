"""The workflow on a real SLURM (single node on 127.0.0.1, `make slurm-up`) with profiles/slurm.

Every job must be an sbatch job: the test collects the SLURM job ids from Snakemake's log, prints
them, and asks the controller that each one exists and COMPLETED. The run happens in a temporary
working directory, so the checkout's results/ is never touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stepseg import manifest

# requires("slurm"): skipped without a controller, failed instead under STEPSEG_REQUIRE=slurm
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.requires("slurm")]

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
DONE = re.compile(r"^(\d+) of (\d+) steps \(100%\) done", re.MULTILINE)
LOCAL = re.compile(r"^local(?:rule|checkpoint) \w+:$", re.MULTILINE)
NIFTI_NAMES = ["CT", "PET", "SUV", "CTres", "SEG"]


def job_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job as the controller knows it (it keeps finished jobs for MinJobAge)."""
    result = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T", "--jobs", ",".join(job_ids)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return dict(line.split("|", 1) for line in result.stdout.split())


def node_profile(workdir: Path) -> Path:
    """profiles/slurm as shipped, adapted to the test node the way a user adapts it to a site.

    The node has 2 CPUs, ~20 GB and no GPU: GPU rules run on the CPU (gpu=0), and no job asks
    for more CPUs or memory than the node has, or sbatch would refuse it. Status checks start
    after 2 s instead of 20 s (still far below the node's MinJobAge of 7200 s).
    """
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    for rule in ("train", "infer"):
        profile["set-resources"][rule].update(gpu=0, mem_mb=6000)
    profile["set-threads"] = {rule: 2 for rule in profile["set-threads"]}
    profile["slurm-init-seconds-before-status-checks"] = 2
    directory = workdir / "node-profile"
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(profile))
    return directory


def run_on_slurm(workdir: Path, profile: Path, *targets: str) -> list[str]:
    """Run Snakemake with the SLURM executor; return the SLURM job ids it submitted."""
    result = subprocess.run(
        [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
         "--configfile", str(workdir / "tiny.yaml"), str(workdir / "short.yaml"),
         "--workflow-profile", str(profile),
         *targets],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "Using workflow specific profile" in output and str(profile) in output
    job_ids = SUBMITTED.findall(output)
    # every job ran as a SLURM job, except rules without an action (rule all), run in place
    *_, (done, total) = DONE.findall(output)
    assert done == total
    assert len(job_ids) == int(total) - len(LOCAL.findall(output)), output[-8000:]
    return job_ids


def test_workflow_jobs_are_slurm_jobs(tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copytree(ROOT / "config", workdir / "config")
    shutil.copy(ROOT / "tests" / "data" / "tiny.yaml", workdir / "tiny.yaml")
    # SLURM is the subject here, not learning: one short epoch per variant
    short = {
        "train": {
            "epochs": 1,
            "samples_per_epoch": 4,
            "val_samples": 2,
            "batch_size": 2,
            "patch_size": [16, 32, 32],
            "channels": [4, 8],
            "num_res_units": 0,
        }
    }
    (workdir / "short.yaml").write_text(yaml.safe_dump(short))
    profile = node_profile(tmp_path)

    job_ids = run_on_slurm(workdir, profile)  # the default target: the report

    with capsys.disabled():  # the CI log shows the real sbatch job ids
        print(f"\nSLURM job ids of the workflow's {len(job_ids)} jobs: {' '.join(job_ids)}")
    assert len(set(job_ids)) == len(job_ids)
    states = job_states(job_ids)
    print("states reported by squeue:", states)
    assert states == dict.fromkeys(job_ids, "COMPLETED")
    studies = manifest.read(workdir / "results" / "manifest.tsv")["study_id"]
    assert len(studies) >= 2
    # per study: download, convert, targets; then inference of every variant on val and test
    assert len(job_ids) > 3 * len(studies)
    for study in studies:
        for name in NIFTI_NAMES:
            assert (workdir / "results" / "nifti" / study / f"{name}.nii.gz").stat().st_size > 0
    assert "Dice" in (workdir / "results" / "report" / "results.md").read_text()
