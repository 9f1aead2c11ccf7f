"""The workflow on a real SLURM (single node on 127.0.0.1, `make slurm-up`) with profiles/slurm.

Every job must be an sbatch job: the test collects the SLURM job ids from Snakemake's log, prints
them, and asks the controller that each one exists and COMPLETED. The run happens in a temporary
working directory, so the checkout's results/ is never touched. The node has no GPU: the run says
`compute: {gpus: 0}`, and the GPU requests of train and infer (`compute: {gpus: auto}` with the
SLURM executor) are checked on the sbatch calls the controller refuses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from stepseg import manifest
from stepseg.names import NIFTI_NAMES

# requires("slurm"): skipped without a controller, failed instead under STEPSEG_REQUIRE=slurm
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.requires("slurm")]

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
DONE = re.compile(r"^(\d+) of (\d+) steps \(100%\) done", re.MULTILINE)
LOCAL = re.compile(r"^local(?:rule|checkpoint) \w+:$", re.MULTILINE)


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

    The node has 2 CPUs and ~20 GB: no job asks for more CPUs or memory than the node has, or
    sbatch would refuse it (its lack of a GPU is the config's business: `compute: {gpus: 0}`).
    Status checks start after 2 s instead of 20 s (still far below the node's MinJobAge of
    7200 s).
    """
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    for rule in ("train", "infer"):
        profile["set-resources"][rule].update(mem_mb=6000)
    profile["set-threads"] = {rule: 2 for rule in profile["set-threads"]}
    profile["slurm-init-seconds-before-status-checks"] = 2
    directory = workdir / "node-profile"
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(profile))
    return directory


def snakemake_on_slurm(
    workdir: Path, profile: Path, *args: str, configs: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Snakemake with the SLURM executor on `workdir` (tiny.yaml, short.yaml, then `configs`)."""
    configfiles = [str(workdir / name) for name in ("tiny.yaml", "short.yaml", *configs)]
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
         "--workflow-profile", str(profile),
         *args,  # targets too: after --configfile they would be read as config files
         "--configfile", *configfiles],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )  # fmt: skip


def run_on_slurm(workdir: Path, profile: Path, *targets: str) -> list[str]:
    """Run Snakemake with the SLURM executor; return the SLURM job ids it submitted."""
    result = snakemake_on_slurm(workdir, profile, *targets)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "Using workflow specific profile" in output and str(profile) in output
    job_ids = SUBMITTED.findall(output)
    # every job ran as a SLURM job, except rules without an action (rule all), run in place
    *_, (done, total) = DONE.findall(output)
    assert done == total
    assert len(job_ids) == int(total) - len(LOCAL.findall(output)), output[-8000:]
    return job_ids


@dataclass(frozen=True)
class SlurmRun:
    workdir: Path
    profile: Path
    job_ids: list[str]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> SlurmRun:
    """The whole workflow (default target: the report) run on SLURM, on the CPU."""
    tmp_path = tmp_path_factory.mktemp("slurm")
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
        },
        "compute": {"gpus": 0},  # the test node has no GPU
    }
    (workdir / "short.yaml").write_text(yaml.safe_dump(short))
    profile = node_profile(tmp_path)
    return SlurmRun(workdir, profile, run_on_slurm(workdir, profile))


def test_workflow_jobs_are_slurm_jobs(slurm_run, capsys):
    workdir, job_ids = slurm_run.workdir, slurm_run.job_ids
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


SBATCH_REFUSED = re.compile(
    r"SLURM sbatch failed\. The error message was '([^']*)'\.\n\s+sbatch call:\n\s+(sbatch [^\n]*)"
)


def refused_sbatch_calls(output: str) -> list[tuple[str, str]]:
    """(sbatch's error, the sbatch call) of every submission the controller refused."""
    return SBATCH_REFUSED.findall(output)


@pytest.mark.parametrize(
    ("change", "args", "gpus"),
    [
        # train: one GPU per DDP process of the variant (here 2); the model is then out of date
        (
            {"train": {"variants": {"stepwise": {"targets": "stepwise", "seeds": [0],
                                                 "processes": 2}}}},
            ["results/models/stepwise-seed0/fold0/model.pt"],
            2,
        ),
        # infer: one GPU, requested again for an existing model
        ({}, ["results/predictions/plain-seed0/test/chunk-0", "--forcerun", "infer"], 1),
    ],
    ids=["train", "infer"],
)  # fmt: skip
def test_gpu_jobs_ask_slurm_for_their_gpus(slurm_run, change, args, gpus):
    """With `compute: {gpus: auto}` (the shipped default) the SLURM executor asks sbatch for the
    job's GPUs although the submit host has none. The test node has none either, so the
    controller refuses the submission at once, and its error report shows the sbatch call."""
    name = f"gpus-{gpus}.yaml"
    (slurm_run.workdir / name).write_text(yaml.safe_dump({"compute": {"gpus": "auto"}, **change}))
    result = snakemake_on_slurm(slurm_run.workdir, slurm_run.profile, *args, configs=(name,))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-8000:]
    refused = refused_sbatch_calls(output)
    assert refused, output[-8000:]
    # the job and each of the profile's 2 retries: one submission each, all refused the same way
    assert len(refused) == 3, output[-8000:]
    for error, call in refused:
        assert error == "sbatch: error: Invalid generic resource (gres) specification", call
        assert f" --gpus={gpus} " in call, call
        assert "--gres" not in call, call
    assert not SUBMITTED.findall(output)
