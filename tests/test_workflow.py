"""End to end: real Snakemake runs of the whole workflow on a miniature synthetic cohort.

One module-scoped run is shared by the checks; each check asks Snakemake (dry run) what a change
would rerun, which is exactly what a user sees after editing config.yaml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from reference.geometry import assert_ctres_geometry

from stepseg import manifest, nifti

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def snakemake(
    workdir: Path, *args: str, overrides: dict | None = None, timeout_s: float = 1500
) -> str:
    """Run Snakemake on `workdir`; a whole run gets 25 min, a dry run far less (see callers)."""
    configs = [str(workdir / "tiny.yaml")]
    if overrides:
        (workdir / "change.yaml").write_text(yaml.safe_dump(overrides))
        configs.append(str(workdir / "change.yaml"))
    result = subprocess.run(
        [
            str(SNAKEMAKE),
            "-s",
            str(ROOT / "Snakefile"),
            "-d",
            str(workdir),
            "--cores",
            "2",
            "--configfile",
            *configs,
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def planned_jobs(workdir: Path, overrides: dict | None = None) -> dict[str, int]:
    """Rule -> job count that a run would execute now (from the dry run's job stats)."""
    output = snakemake(workdir, "--dry-run", overrides=overrides)
    if "Nothing to be done" in output:
        return {}
    stats = output.split("Job stats:", 1)[1]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, flags=re.MULTILINE))
    jobs.pop("total", None)
    jobs.pop("all", None)
    return {rule: int(count) for rule, count in jobs.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    shutil.copytree(ROOT / "config", workdir / "config")
    shutil.copy(ROOT / "tests" / "data" / "tiny.yaml", workdir / "tiny.yaml")
    snakemake(workdir)
    return workdir


def test_conversion_matches_the_generators_truth_for_every_study(run):
    table = manifest.read(run / "results" / "manifest.tsv")
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    for study in table["study_id"]:
        truth = run / "results" / "raw" / study / "truth"
        out = run / "results" / "nifti" / study
        suv, true_suv = (nifti.load(d / "SUV.nii.gz", study) for d in (out, truth))
        seg, true_seg = (nifti.load(d / "SEG.nii.gz", study) for d in (out, truth))
        ctres, true_ct = (nifti.load(d / "CTres.nii.gz", study) for d in (out, truth))
        grid = {"SUV": suv, "CTres": ctres, "SEG": seg}
        nifti.check_same_grid(study, {n: (out / f"{n}.nii.gz", v) for n, v in grid.items()})
        body = true_suv.array > 0.5
        rel = np.abs(suv.array[body] - true_suv.array[body]) / true_suv.array[body]
        assert np.median(rel) < 0.01, study
        np.testing.assert_array_equal(seg.array, true_seg.array)
        assert_ctres_geometry(ctres.array, true_ct.array)
        assert bool(seg.array.any()) == bool(table.set_index("study_id").at[study, "has_lesions"])


def test_report_has_the_paper_table_for_every_variant(run):
    results = pd.read_csv(run / "results" / "report" / "results.csv")
    text = (run / "results" / "report" / "results.md").read_text()
    assert "Preliminary test set" in text and "Validation set" in text
    assert {"threshold", "stepwise-seed0"} <= set(results["variant"])


def test_finished_run_is_a_no_op(run):
    assert planned_jobs(run) == {}


def test_convert_setting_reruns_conversion_and_what_follows_only(run):
    jobs = planned_jobs(run, {"convert": {"ctres_interpolation": "nearest"}})
    n_studies = len(manifest.read(run / "results" / "manifest.tsv"))
    assert jobs["convert"] == n_studies
    assert "download" not in jobs and "manifest" not in jobs
    assert {"targets", "pack", "train", "infer", "evaluate", "report"} <= set(jobs)


def test_report_setting_reruns_only_the_report(run):
    assert planned_jobs(run, {"report": {"figure_dpi": 100}}) == {"report": 1}


def test_target_setting_reruns_targets_packing_and_everything_after(run):
    jobs = planned_jobs(run, {"targets": {"preset": "released_code"}})
    assert {"targets", "pack", "train", "infer", "evaluate", "report"} <= set(jobs)
    assert not {"download", "convert", "infer_threshold"} & set(jobs)


def test_training_setting_reruns_neither_targets_nor_packing(run):
    jobs = planned_jobs(run, {"train": {"epochs": 3}})
    assert jobs["train"] == 2
    assert not {"targets", "pack", "convert", "infer_threshold"} & set(jobs)


def test_one_variants_setting_reruns_only_that_variant(run):
    table = manifest.read(run / "results" / "manifest.tsv")
    n_eval = int(table["split"].isin(["val", "test"]).sum())
    change = {"train": {"variants": {"plain": {"targets": "plain", "seeds": [0], "lr": 5.0e-4}}}}
    jobs = planned_jobs(run, change)
    assert jobs == {"train": 1, "infer": n_eval, "evaluate": 2, "report": 1}
    dry_run = snakemake(run, "--dry-run", overrides=change)
    assert "output: results/models/plain-seed0/model.pt" in dry_run
    assert "output: results/models/stepwise-seed0/model.pt" not in dry_run


@pytest.mark.parametrize(("cores", "threads"), [(2, 1), (8, 4), (64, 8)])
def test_trainings_share_the_cores(run, cores, threads):
    """tiny.yaml trains 2 variants: each training job gets cores // 2 threads, 1 to 8."""
    dry_run = snakemake(run, "--dry-run", "--forcerun", "train", "--cores", str(cores))
    jobs = dry_run.split("rule train:")[1:]
    assert len(jobs) == 2
    for job in jobs:
        block = job.split("\n[")[0]  # up to the next job's timestamp line
        shown = re.search(r"^\s+threads: (\d+)$", block, flags=re.MULTILINE)
        assert (int(shown.group(1)) if shown else 1) == threads  # Snakemake omits 1 thread


def test_tcia_source_against_a_local_server_gives_the_same_results(run, tmp_path):
    """The same cohort served as TCIA series ZIPs runs to the report with identical outputs."""
    from tcia_server import NbiaTestServer

    table = manifest.read(run / "results" / "manifest.tsv")
    workdir = tmp_path / "tcia"
    shutil.copytree(ROOT / "config", workdir / "config")
    shutil.copy(ROOT / "tests" / "data" / "tiny.yaml", workdir / "tiny.yaml")
    with NbiaTestServer.from_dicom_tree(run / "results" / "raw") as server:
        clinical = workdir / "clinical.csv"
        server.write_clinical_file(clinical, table.loc[table["has_lesions"], "study_id"])
        tcia = {"base_url": server.base_url, "clinical_file": str(clinical), "timeout_s": 10}
        snakemake(workdir, overrides={"download": {"source": "tcia", "tcia": tcia}})

    ours = manifest.read(workdir / "results" / "manifest.tsv")
    columns = ["study_id", "patient_id", "split", "has_lesions"]
    pd.testing.assert_frame_equal(ours[columns], table[columns])
    for study in table["study_id"]:
        for name in ("SUV", "CTres", "SEG", "CT", "PET"):
            a = nifti.load(run / "results" / "nifti" / study / f"{name}.nii.gz", study)
            b = nifti.load(workdir / "results" / "nifti" / study / f"{name}.nii.gz", study)
            np.testing.assert_array_equal(a.array, b.array)
            np.testing.assert_array_equal(a.affine, b.affine)
    for path in sorted((run / "results" / "metrics").rglob("*.csv")):
        twin = workdir / path.relative_to(run)
        pd.testing.assert_frame_equal(pd.read_csv(path), pd.read_csv(twin))
    # the same numbers; only the wording of where the data came from differs ("our tcia test split")
    report_csv = Path("results") / "report" / "results.csv"
    ours_report, their_report = (pd.read_csv(d / report_csv) for d in (workdir, run))
    assert ours_report["data"].str.contains("tcia").any()
    pd.testing.assert_frame_equal(
        ours_report.drop(columns="data"), their_report.drop(columns="data")
    )
