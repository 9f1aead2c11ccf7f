"""End to end: real Snakemake runs of the whole workflow on a miniature synthetic cohort.

One module-scoped run is shared by the checks; each check asks Snakemake (dry run) what a change
would rerun, which is exactly what a user sees after editing config.yaml.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from reference.geometry import assert_ctres_geometry

from stepseg import devices, manifest, names, nifti
from stepseg.tilestore import TileStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# the tiny run's cross-validation folds and the splits its models are evaluated on
TINY_FOLDS = yaml.safe_load((ROOT / "tests" / "data" / "tiny.yaml").read_text())["train"]["folds"]
TINY_EVAL_SPLITS = names.eval_splits(TINY_FOLDS)


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
            *args,  # targets too: after --configfile they would be read as config files
            "--configfile",
            *configs,
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
    output = snakemake(workdir, "--dry-run", overrides=overrides, timeout_s=300)
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
        # coarse grids (PET 8 mm, CT 5-6.4 mm): 15-24 HU median inside the body, measured
        assert_ctres_geometry(ctres.array, true_ct.array, median_hu=30.0)
        assert bool(seg.array.any()) == bool(table.set_index("study_id").at[study, "has_lesions"])


def test_report_has_the_paper_table_for_every_variant(run):
    results = pd.read_csv(run / "results" / "report" / "results.csv")
    text = (run / "results" / "report" / "results.md").read_text()
    assert "Preliminary test set" in text
    assert report_set_label(TINY_EVAL_SPLITS[0]) in text
    assert {"threshold", "stepwise-seed0"} <= set(results["variant"])
    assert set(results["split"]) == set(TINY_EVAL_SPLITS)


def report_set_label(split: str) -> str:
    from stepseg import report

    return report.SET_LABELS[split]


# one study's line in an infer job's log: the models that predicted it
PREDICTED = re.compile(
    r" INFO stepseg\.infer: (\S+): \d+ lesion voxels .* predicted with (.+)$",
    re.M,
)


def predicted_by(run: Path, trained: str, split: str) -> dict[str, str]:
    """study -> the model(s) that predicted it, from the infer logs of `trained` on `split`;
    a study predicted twice fails."""
    found: dict[str, str] = {}
    for log in sorted((run / "results" / "logs" / "infer" / trained / split).glob("*.log")):
        for study, models in PREDICTED.findall(log.read_text()):
            assert study not in found, f"{study} predicted twice on {split}: {log}"
            found[study] = models
    return found


def test_out_of_fold_predictions_come_from_the_model_that_did_not_train_on_the_study(run):
    """The finished tiny run (train.folds 2): fold f's LMDBs hold the other folds' studies
    (train) and fold f's (val), as the manifest deals them; each fold model trained on its own
    train LMDB; every non-test study was predicted out of fold exactly once, by the model of its
    fold, whose train LMDB lacks it; every test study by the ensemble of all fold models; the
    out-of-fold metrics cover every non-test study."""
    assert TINY_FOLDS >= 2
    table = manifest.read(run / "results" / "manifest.tsv")
    non_test = table[table["split"] != "test"]
    fold_of = dict(zip(non_test["study_id"], non_test["fold"].astype(int), strict=True))
    assert set(fold_of.values()) == set(range(TINY_FOLDS))
    lmdb_dir = run / "results" / "lmdb"
    lmdb = {
        (fold, part): set(TileStore(lmdb_dir / f"fold{fold}" / f"{part}.lmdb").studies)
        for fold in range(TINY_FOLDS)
        for part in SETS
    }
    for fold in range(TINY_FOLDS):
        assert lmdb[(fold, "val")] == {s for s, f in fold_of.items() if f == fold}
        assert lmdb[(fold, "train")] == {s for s, f in fold_of.items() if f != fold}
    models = [f"{v}-seed0" for v in ("stepwise", "plain")]
    for trained in models:
        fold_models = [f"results/models/{trained}/fold{f}/model.pt" for f in range(TINY_FOLDS)]
        for fold in range(TINY_FOLDS):
            logged = (run / "results" / "logs" / "train" / trained / f"fold{fold}.log").read_text()
            assert f"training {trained} on results/lmdb/fold{fold}/train.lmdb:" in logged
        out_of_fold = predicted_by(run, trained, names.OUT_OF_FOLD)
        assert out_of_fold == {study: fold_models[fold] for study, fold in fold_of.items()}
        for study, fold in fold_of.items():
            assert study not in lmdb[(fold, "train")] and study in lmdb[(fold, "val")]
        chunks = run / "results" / "predictions" / trained / names.OUT_OF_FOLD
        written = sorted(path.name for path in chunks.glob("*/*.nii.gz"))
        masks = [f"{s}.nii.gz" for s in fold_of]
        # a stepwise model also writes each mask's presence map (stepseg.gate)
        presence = [f"{s}.presence.nii.gz" for s in fold_of] if trained.startswith("step") else []
        assert written == sorted(masks + presence)
        test_studies = set(table.loc[table["split"] == "test", "study_id"])
        assert predicted_by(run, trained, "test") == dict.fromkeys(
            test_studies, " + ".join(fold_models)
        )
        metrics_csv = run / "results" / "metrics" / trained / f"{names.OUT_OF_FOLD}_per_study.csv"
        assert sorted(pd.read_csv(metrics_csv)["study"]) == sorted(fold_of)


def test_the_gated_variant_is_chosen_out_of_fold_and_evaluated_beside_its_model(run):
    """Each stepwise model's gate job: one threshold per fold (chosen on the other fold) and
    one for test, its masks a subset of the model's, evaluated on both splits and reported."""
    record = json.loads((run / "results" / "gate" / "stepwise-seed0.json").read_text())
    assert record["selection_split"] == names.OUT_OF_FOLD
    assert sorted(record["fold_thresholds"]) == [str(f) for f in range(TINY_FOLDS)]
    gated = run / "results" / "predictions" / "stepwise_gated-seed0"
    for split in TINY_EVAL_SPLITS:
        for path in sorted((gated / split).glob("*.nii.gz")):
            (own,) = (run / "results" / "predictions" / "stepwise-seed0" / split).glob(
                f"*/{path.name}"
            )
            mask = nifti.load(path, path.name).array
            assert not (mask & ~nifti.load(own, path.name).array).any()
        metrics_csv = (
            run / "results" / "metrics" / "stepwise_gated-seed0" / f"{split}_per_study.csv"
        )
        assert len(pd.read_csv(metrics_csv)) == len(list((gated / split).glob("*.nii.gz")))
    assert "stepwise_gated-seed0" in (run / "results" / "report" / "results.md").read_text()


def test_finished_run_is_a_no_op(run):
    assert planned_jobs(run) == {}


@dataclass(frozen=True)
class Cohort:
    """What the job counts of a rerun depend on: studies per role, trained models and folds."""

    studies: int
    train_val: int  # studies with step maps (targets), packed for training and validation
    evaluated: int  # studies of the evaluation splits (val or oof, test): every variant's
    trained: int  # models (variants x seeds); the threshold baseline comes on top
    folds: int  # training jobs per trained model
    gated: int  # models with step-by-step targets: each has a gate job and a gated variant

    @classmethod
    def of(cls, workdir: Path, folds: int = TINY_FOLDS) -> Cohort:
        table = manifest.read(workdir / "results" / "manifest.tsv")
        train_val = int(table["split"].isin(["train", "val"]).sum())
        evaluated = len(evaluated_pairs(workdir, folds))
        config = yaml.safe_load((workdir / "tiny.yaml").read_text())["train"]["variants"]
        trained = sum(len(v["seeds"]) for v in config.values())
        gated = sum(len(v["seeds"]) for v in config.values() if v["targets"] == "stepwise")
        return cls(len(table), train_val, evaluated, trained, folds, gated)


# Job counts per rule, in one place: the rules' granularity changes here and nowhere else.
def infer_jobs(c: Cohort, models: int) -> int:
    """Trained-model predictions: one job per model and infer chunk; in the tiny cohort each
    split (val or each fold's out-of-fold studies, test) fits one chunk of
    `infer.studies_per_job` studies (larger cohorts:
    test_inference_of_the_collection_is_spread_over_chunk_jobs)."""
    return models * (2 if c.folds == 1 else c.folds + 1)


def evaluate_jobs(models: int) -> int:
    """One job per variant (trained or threshold) and evaluation split (val, test)."""
    return 2 * models


def from_conversion(c: Cohort) -> dict[str, int]:
    """New NIfTI files of every study: everything after the download reruns."""
    return {
        "convert": c.studies,
        "infer_threshold": c.evaluated,
        **from_targets(c),
        "evaluate": evaluate_jobs(c.trained + c.gated + 1),
    }


def from_targets(c: Cohort) -> dict[str, int]:
    return {"targets": c.train_val, **from_packing(c)}


def from_packing(c: Cohort) -> dict[str, int]:
    return {"pack": 2 * c.folds, **from_training(c)}  # each fold's train and val LMDBs


def from_training(c: Cohort, models: int | None = None, gated: int | None = None) -> dict[str, int]:
    """`models` models (every one by default) train anew, `gated` of them step-by-step ones."""
    models = c.trained if models is None else models
    return {"train": models * c.folds, **from_inference(c, models, gated)}


def from_inference(
    c: Cohort, models: int | None = None, gated: int | None = None
) -> dict[str, int]:
    """New predictions of `models` models, `gated` of them with a gate job and gated variant."""
    models = c.trained if models is None else models
    gated = c.gated if gated is None else gated
    return {
        "infer": infer_jobs(c, models),
        **({"gate": gated} if gated else {}),
        "evaluate": evaluate_jobs(models + gated),
        "report": 1,
    }


def from_evaluation(c: Cohort) -> dict[str, int]:
    """Every variant's metrics: the trained, the gated and the threshold baseline's."""
    return {"evaluate": evaluate_jobs(c.trained + c.gated + 1), "report": 1}


# config change -> the jobs a user must see planned after it, on the finished tiny run
RERUN_SCOPES = {
    "convert: SUV reference time": ({"convert": {"suv_reference_time": "series"}}, from_conversion),
    "convert: CTres interpolation": (
        {"convert": {"ctres_interpolation": "nearest"}},
        from_conversion,
    ),
    "targets: preset": ({"targets": {"preset": "released_code"}}, from_targets),
    "pack: codec level": ({"pack": {"level": 2}}, from_packing),
    "train: common setting": ({"train": {"epochs": 3}}, from_training),
    "train: one variant": (
        {"train": {"variants": {"plain": {"targets": "plain", "seeds": [0], "lr": 5.0e-4}}}},
        lambda c: from_training(c, models=1, gated=0),
    ),
    "infer": ({"infer": {"overlap": 0.25}}, from_inference),
    "threshold": (
        {"threshold": {"suv": 3.0}},
        lambda c: {"infer_threshold": c.evaluated, "evaluate": evaluate_jobs(1), "report": 1},
    ),
    "evaluate": ({"evaluate": {"connectivity": 26}}, from_evaluation),
    "report": ({"report": {"figure_dpi": 100}}, lambda c: {"report": 1}),
    # the gated variants leave the report; no model or prediction reruns
    "gate: off": ({"gate": {"enabled": False}}, lambda c: {"report": 1}),
    "download: settings of another source": (
        {"download": {"tcia": {"timeout_s": 5}}},
        lambda c: {},
    ),
    # where jobs run, not what they compute: resources are no rerun trigger
    "compute: GPUs": ({"compute": {"gpus": 1}}, lambda c: {}),
}


@pytest.mark.parametrize(("change", "expected"), RERUN_SCOPES.values(), ids=RERUN_SCOPES.keys())
def test_a_config_change_reruns_exactly_what_depends_on_it(run, change, expected):
    assert planned_jobs(run, change) == expected(Cohort.of(run))


def test_one_variants_setting_reruns_only_that_variant(run):
    change = {"train": {"variants": {"plain": {"targets": "plain", "seeds": [0], "lr": 5.0e-4}}}}
    assert planned_jobs(run, change) == from_training(Cohort.of(run), models=1, gated=0)
    dry_run = snakemake(run, "--dry-run", overrides=change)
    assert "output: results/models/plain-seed0/fold0/model.pt" in dry_run
    assert "output: results/models/stepwise-seed0/fold0/model.pt" not in dry_run


def changed_manifest(run: Path, workdir: Path, change: dict) -> tuple[Cohort, Cohort]:
    """A copy of the finished run whose manifest was rebuilt under `change` (a dry run cannot see
    past a checkpoint that must rerun): the cohorts before and after."""
    assert planned_jobs(run, change).get("manifest") == 1
    shutil.copytree(run, workdir, symlinks=True)  # copy2 keeps the times Snakemake compares
    snakemake(workdir, "results/manifest.tsv", overrides=change, timeout_s=300)
    return Cohort.of(run), Cohort.of(workdir)


def split_studies(workdir: Path, splits: list[str]) -> set[str]:
    table = manifest.read(workdir / "results" / "manifest.tsv")
    return set(table.loc[table["split"].isin(splits), "study_id"])


def evaluated_pairs(workdir: Path, folds: int = TINY_FOLDS) -> set[tuple[str, str]]:
    """(study, split) of every evaluated study: predictions live under their split's folder
    (out of fold: every non-test study)."""
    table = manifest.read(workdir / "results" / "manifest.tsv")
    split = table["split"]
    if folds > 1:
        split = split.where(split == "test", names.OUT_OF_FOLD)
    chosen = split.isin(names.eval_splits(folds))
    return set(zip(table.loc[chosen, "study_id"], split[chosen], strict=True))


def test_split_change_reruns_neither_download_nor_conversion(run, tmp_path):
    """A new split seed reassigns patients: only studies new to training or validation need step
    maps, only studies new to evaluation need a threshold prediction; both LMDBs, every model,
    every prediction of a model and every evaluation are redone."""
    change = {"split": {"seed": 1}}
    _, after = changed_manifest(run, tmp_path / "copy", change)
    moved = tmp_path / "copy"
    new_train_val = split_studies(moved, ["train", "val"]) - split_studies(run, ["train", "val"])
    new_evaluated = evaluated_pairs(moved) - evaluated_pairs(run)
    assert new_train_val and new_evaluated  # seed 1 moves studies both ways on this cohort
    expected = {
        "targets": len(new_train_val),
        "pack": 2 * after.folds,
        **from_training(after),
        "infer_threshold": len(new_evaluated),
        "evaluate": evaluate_jobs(after.trained + after.gated + 1),
    }
    assert planned_jobs(moved, change) == expected


@pytest.mark.parametrize("folds", sorted({1, 3} - {TINY_FOLDS}))
def test_folds_change_reruns_packing_training_and_after_never_the_data(run, tmp_path, folds):
    """Another `train.folds` rewrites the manifest (the same test patients, other folds) and
    reruns packing, every training, inference, evaluation and the report, plus the threshold
    baseline on studies new to an evaluation split; never a download, conversion or step map."""
    change = {"train": {"folds": folds}}
    before, after = changed_manifest(run, tmp_path / "copy", change)
    moved = manifest.read(tmp_path / "copy" / "results" / "manifest.tsv")
    original = manifest.read(run / "results" / "manifest.tsv")
    assert moved["split"].eq("test").equals(original["split"].eq("test"))
    after = Cohort.of(tmp_path / "copy", folds=folds)
    assert (after.studies, after.train_val) == (before.studies, before.train_val)
    new_evaluated = evaluated_pairs(tmp_path / "copy", folds) - evaluated_pairs(run)
    expected = {
        **from_packing(after),
        "infer_threshold": len(new_evaluated),
        # the threshold baseline's test metrics stand (the same test studies); it is evaluated
        # anew only on a new evaluation split
        "evaluate": evaluate_jobs(after.trained + after.gated) + bool(new_evaluated),
    }
    assert planned_jobs(tmp_path / "copy", change) == {k: v for k, v in expected.items() if v}


@pytest.mark.parametrize(
    "setting", [{"pet_noise": 0.2}, {"ct_padding_hu": -3024}, {"seg_layout": "lesion_frames"}]
)
def test_source_setting_change_reruns_everything_from_the_download(run, tmp_path, setting):
    change = {"download": {"synthetic": setting}}
    before, after = changed_manifest(run, tmp_path / "copy", change)
    assert after == before  # the same studies and splits, other DICOM
    expected = {"download": after.studies, **from_conversion(after)}
    assert planned_jobs(tmp_path / "copy", change) == expected


def test_threshold_baseline_finds_the_lesions(run):
    """The classical baseline on the tiny cohort: a finite, non-zero Dice on both evaluation
    splits, each of which holds a lesion study (empty predictions would score 0)."""
    for split in TINY_EVAL_SPLITS:
        summary = pd.read_csv(run / "results" / "metrics" / "threshold" / f"{split}_summary.csv")
        assert int(summary.at[0, "n_lesion_studies"]) >= 1, split
        dice = float(summary.at[0, "dice"])
        assert np.isfinite(dice) and dice > 0, (split, dice)


@pytest.mark.parametrize("cores", [2, 8, 64])
def test_trainings_share_the_cores(run, cores):
    """tiny.yaml trains 2 variants, each in `folds` jobs: each training job gets
    cores // (2 x folds) threads, 1 to 8."""
    dry_run = snakemake(run, "--dry-run", "--forcerun", "train", "--cores", str(cores))
    jobs = dry_run.split("rule train:")[1:]
    assert len(jobs) == 2 * TINY_FOLDS
    threads = {2: 1, 8: 8 // (2 * TINY_FOLDS), 64: 8}[cores]
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


# A job header as Snakemake prints it when it starts the job (and in a dry run).
JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$", re.MULTILINE)
# A job header and its indented lines (input, output, ..., wildcards, resources).
JOB_BLOCK = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*(?:\n|$))*)", re.M)


def ran_jobs(output: str) -> dict[str, int]:
    """Rule -> jobs a real run executed (the job headers it printed), without rule `all`."""
    counts = Counter(JOB_HEADER.findall(output))
    counts.pop("all", None)
    return dict(counts)


def job_wildcards(output: str, rule: str) -> list[str]:
    """The `wildcards:` line of every job of `rule` the run printed, sorted."""
    return sorted(
        re.search(r"^\s+wildcards: (.*)$", body, re.MULTILINE).group(1)
        for name, body in JOB_BLOCK.findall(output)
        if name == rule
    )


def study_file_times(workdir: Path, studies: set[str]) -> dict[str, int]:
    """mtime (ns) of each study's raw folder and converted SUV: a rerun download or conversion
    rewrites them (Snakemake deletes the outputs before it runs a job)."""
    return {
        str(path.relative_to(workdir)): path.stat().st_mtime_ns
        for study in studies
        for path in (
            workdir / "results" / "raw" / study,
            workdir / "results" / "nifti" / study / "SUV.nii.gz",
        )
    }


@dataclass(frozen=True)
class MovedRun:
    """A copy of the finished run after a new split seed, run up to both LMDBs."""

    workdir: Path
    change: dict  # the config change that moved the studies
    output: str  # Snakemake's output of the run up to the LMDBs
    studies: set[str]  # every study of the cohort
    file_times: dict[str, int]  # their `study_file_times` before that run


@pytest.fixture(scope="module")
def moved_run(run, tmp_path_factory) -> MovedRun:
    workdir = tmp_path_factory.mktemp("moved") / "copy"
    shutil.copytree(run, workdir, symlinks=True)  # copy2 keeps the times Snakemake compares
    studies = set(manifest.read(run / "results" / "manifest.tsv")["study_id"])
    before = study_file_times(workdir, studies)
    change = {"split": {"seed": 1}}
    lmdbs = [f"results/lmdb/fold{f}/{part}.lmdb" for f in range(TINY_FOLDS) for part in SETS]
    output = snakemake(workdir, *lmdbs, overrides=change)
    return MovedRun(workdir, change, output, studies, before)


SETS = ("train", "val")  # each fold's LMDBs


def test_split_change_real_run_fetches_and_converts_nothing(run, moved_run):
    """A real run after a new split seed, up to both LMDBs: the manifest is rewritten and only
    studies new to training or validation get step maps; no study is fetched or converted."""
    workdir = moved_run.workdir
    new_train_val = split_studies(workdir, ["train", "val"]) - split_studies(run, ["train", "val"])
    assert new_train_val  # seed 1 moves studies into training on this cohort
    assert ran_jobs(moved_run.output) == {
        "manifest": 1,
        "targets": len(new_train_val),
        "pack": 2 * TINY_FOLDS,
    }
    assert job_wildcards(moved_run.output, "targets") == sorted(f"study={s}" for s in new_train_val)
    assert study_file_times(workdir, moved_run.studies) == moved_run.file_times


def test_split_change_real_run_trains_afresh(run, moved_run):
    """The new LMDBs hold other studies: the finished training state of the old split is
    discarded, training runs all its epochs and writes another model (it resumed that state and
    wrote the old model byte for byte before the state recorded its data)."""
    # fold 1: its new train LMDB shares one study with the old; fold 0's shares two, and its
    # first epoch logged the old first-epoch loss to the last digit (measured)
    workdir, trained, fold = moved_run.workdir, "plain-seed0", "fold1"
    model = Path("results") / "models" / trained / fold / "model.pt"
    output = snakemake(workdir, str(model), overrides=moved_run.change)
    assert ran_jobs(output) == {"train": 1}
    # this job's log only: Snakemake removes a job's log before it runs the job
    logged = (workdir / "results" / "logs" / "train" / trained / f"{fold}.log").read_text()
    assert "train split studies differ" in logged and "starting afresh" in logged
    assert "resumed from" not in logged
    epochs = yaml.safe_load((workdir / "tiny.yaml").read_text())["train"]["epochs"]
    assert re.findall(r"epoch (\d+): ", logged) == [str(e) for e in range(1, epochs + 1)]
    log_csv = Path("results") / "models" / trained / fold / "train_log.csv"
    new_log, old_log = (pd.read_csv(d / log_csv) for d in (workdir, run))
    assert new_log["epoch"].tolist() == list(range(1, epochs + 1))
    assert not np.isclose(new_log["loss"], old_log["loss"]).any()
    assert (workdir / model).read_bytes() != (run / model).read_bytes()


@dataclass(frozen=True)
class TciaRun:
    """The tiny cohort fetched over the NBIA stand-in and converted, all patients but one."""

    workdir: Path
    server: object  # tcia_server.NbiaTestServer, serving the finished run's DICOM series
    change: dict  # the config that made it (source tcia, the server, the patient subset)
    left_out: str  # the patient not fetched


def nifti_targets(studies: set[str]) -> list[str]:
    """One converted file per study: asking for it runs the study's download and conversion."""
    return [f"results/nifti/{study}/SUV.nii.gz" for study in sorted(studies)]


@pytest.fixture(scope="module")
def tcia_run(run, tmp_path_factory) -> Iterator[TciaRun]:
    from tcia_server import NbiaTestServer

    table = manifest.read(run / "results" / "manifest.tsv")
    patients = sorted(set(table["patient_id"]))
    # the patient with a follow-up study, so that "only its studies" means more than one
    left_out = table["patient_id"].value_counts().sort_index().idxmax()
    workdir = tmp_path_factory.mktemp("tcia-subset")
    shutil.copytree(ROOT / "config", workdir / "config")
    shutil.copy(ROOT / "tests" / "data" / "tiny.yaml", workdir / "tiny.yaml")
    with NbiaTestServer.from_dicom_tree(run / "results" / "raw") as server:
        tcia = {
            "base_url": server.base_url,
            "timeout_s": 10,
            "patient_ids": [p for p in patients if p != left_out],
        }
        change = {"download": {"source": "tcia", "tcia": tcia}}
        fetched = set(table.loc[table["patient_id"] != left_out, "study_id"])
        snakemake(workdir, *nifti_targets(fetched), overrides=change, timeout_s=600)
        yield TciaRun(workdir, server, change, left_out)


def test_tcia_fetch_settings_rerun_nothing(tcia_run, tmp_path):
    """How series are fetched (timeouts, retries, checksums, the partial-download cache) is read
    by the job from the config: changing all of it reruns not even the manifest."""
    workdir = tmp_path / "copy"
    shutil.copytree(tcia_run.workdir, workdir, symlinks=True)
    studies = set(manifest.read(workdir / "results" / "manifest.tsv")["study_id"])
    before = study_file_times(workdir, studies)
    change = copy.deepcopy(tcia_run.change)
    change["download"]["tcia"].update(
        timeout_s=5, max_attempts=2, backoff_s=0.5, verify_md5=True, cache_dir="results/.other"
    )
    output = snakemake(workdir, *nifti_targets(studies), overrides=change, timeout_s=300)
    assert "Nothing to be done" in output
    assert ran_jobs(output) == {}
    assert study_file_times(workdir, studies) == before


def test_tcia_added_patient_fetches_and_converts_only_its_studies(run, tcia_run, tmp_path):
    """Adding a patient to patient_ids rewrites the manifest (new splits) and fetches, from the
    server, exactly the new patient's series; no other study is fetched or converted again."""
    workdir = tmp_path / "copy"
    shutil.copytree(tcia_run.workdir, workdir, symlinks=True)
    old = set(manifest.read(workdir / "results" / "manifest.tsv")["study_id"])
    before = study_file_times(workdir, old)
    change = copy.deepcopy(tcia_run.change)
    change["download"]["tcia"]["patient_ids"].append(tcia_run.left_out)
    everyone = manifest.read(run / "results" / "manifest.tsv")
    added = set(everyone.loc[everyone["patient_id"] == tcia_run.left_out, "study_id"])
    assert len(added) == 2 and not added & old
    tcia_run.server.requests.clear()

    output = snakemake(workdir, *nifti_targets(old | added), overrides=change, timeout_s=600)

    assert ran_jobs(output) == {"manifest": 1, "download": 2, "convert": 2}
    assert job_wildcards(output, "download") == sorted(f"study={s}" for s in added)
    assert job_wildcards(output, "convert") == sorted(f"study={s}" for s in added)
    table = manifest.read(workdir / "results" / "manifest.tsv").set_index("study_id")
    added_series = {
        table.at[study, f"{column}_uid"]
        for study in added
        for column in ("ct_series", "pet_series", "seg_series")
    }
    fetched = {uid for endpoint, uid, _ in tcia_run.server.requests if endpoint == "getImage"}
    assert fetched == added_series and len(fetched) == 6
    assert study_file_times(workdir, old) == before


def gpu_requests(output: str) -> dict[str, int]:
    """'<rule> <wildcards>' -> the `gpu` resource of every train and infer job a dry run shows."""
    requests = {}
    for rule, body in JOB_BLOCK.findall(output):
        if rule in ("train", "infer"):
            wildcards = re.search(r"^\s+wildcards: (.*)$", body, re.MULTILINE).group(1)
            shown = re.search(r"^\s+resources: .*\bgpu=(\d+)", body, re.MULTILINE)
            requests[f"{rule} {wildcards}"] = int(shown.group(1)) if shown else 0
    return requests


def expected_gpus(stepwise_train: int, stepwise_infer: int, plain: int) -> dict[str, int]:
    """Every train job (one per fold) and infer job (one per chunk: each fold's out-of-fold
    studies or val, and test) of the tiny run."""
    chunks = {"val": ["chunk-0"], "test": ["chunk-0"]} | {
        names.OUT_OF_FOLD: [f"fold{f}-chunk-0" for f in range(TINY_FOLDS)]
    }
    models = (("stepwise-seed0", stepwise_train, stepwise_infer), ("plain-seed0", plain, plain))
    return {
        **{
            f"train trained={variant}, fold={fold}": gpus
            for variant, gpus, _ in models
            for fold in range(TINY_FOLDS)
        },
        **{
            f"infer trained={variant}, eval_split={split}, chunk={chunk}": gpus
            for variant, _, gpus in models
            for split in TINY_EVAL_SPLITS
            for chunk in chunks[split]
        },
    }


SLURM = ("--workflow-profile", str(ROOT / "profiles" / "slurm"))
HERE = 1 if devices.installed_gpus() else 0  # this machine's cards decide for local jobs
STEPWISE = {"targets": "stepwise", "seeds": [0]}
# (profile arguments, config change) -> GPUs of (stepwise train, stepwise infer, plain)
GPU_REQUESTS = {
    # the login node has no card, the cluster's nodes do: one GPU per process, one per infer job
    "slurm, auto": (SLURM, None, (1, 1, 1)),
    "slurm, 2 DDP processes": (
        SLURM,
        {"train": {"variants": {"stepwise": {**STEPWISE, "processes": 2}}}},
        (2, 1, 1),
    ),
    "slurm, CPU-only cluster": (SLURM, {"compute": {"gpus": 0}}, (0, 0, 0)),
    "slurm, a CPU variant": (
        SLURM,
        {"train": {"variants": {"plain": {"targets": "plain", "seeds": [0], "device": "cpu"}}}},
        (1, 1, 0),
    ),
    "this machine, auto": ((), None, (HERE, HERE, HERE)),
    "this machine, gpus 1": ((), {"compute": {"gpus": 1}}, (1, 1, 1)),
}


@pytest.mark.parametrize(("profile", "change", "gpus"), GPU_REQUESTS.values(), ids=GPU_REQUESTS)
def test_gpu_requests_follow_config_and_executor(run, profile, change, gpus):
    """The dry run shows each train and infer job's `gpu` (sbatch --gpus on SLURM)."""
    dry_run = snakemake(run, "--dry-run", "--forcerun", "train", *profile, overrides=change)
    assert gpu_requests(dry_run) == expected_gpus(*gpus)


def default_config_snakemake(workdir: Path, *args: str) -> str:
    """Snakemake on `workdir` with config/config.yaml alone (a dry run, or the manifest only)."""
    result = subprocess.run(
        [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", "2", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def planned_chunks(output: str) -> dict[tuple[str, str], dict[str, list[str]]]:
    """(model, split) -> chunk -> the studies its infer job reads, from a dry run's job blocks."""
    chunks: dict[tuple[str, str], dict[str, list[str]]] = {}
    for rule, body in JOB_BLOCK.findall(output):
        if rule == "infer":
            wildcards = dict(
                item.split("=", 1)
                for item in re.search(r"^\s+wildcards: (.*)$", body, re.M).group(1).split(", ")
            )
            inputs = re.search(r"^\s+input: (.*)$", body, re.M).group(1).split(", ")
            studies = [p.split("/")[2] for p in inputs if p.endswith("/SUV.nii.gz")]
            key = (wildcards["trained"], wildcards["eval_split"])
            chunks.setdefault(key, {})[wildcards["chunk"]] = studies
    return chunks


def evaluated_predictions(output: str) -> dict[str, list[str]]:
    """The prediction inputs of every evaluate job, by its summary file."""
    found = {}
    for rule, body in JOB_BLOCK.findall(output):
        if rule == "evaluate":
            inputs = re.search(r"^\s+input: (.*)$", body, re.M).group(1).split(", ")
            summary = re.search(r"^\s+output: .*?(\S+_summary\.csv)", body, re.M).group(1)
            found[summary] = [p for p in inputs if p.startswith("results/predictions/")]
    return found


DEFAULT_FOLDS = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["train"]["folds"]
MODELS = ("stepwise-seed0", "plain-seed0")  # config/config.yaml's variants


def expected_chunks(workdir: Path, per_job: int) -> dict[str, dict[str, list[str]]]:
    """Evaluation split -> {chunk name: its studies} under the default config's folds, from the
    working directory's manifest: consecutive sorted studies, at most `per_job` a chunk; out of
    fold, each fold's own studies (`fold<f>-chunk-<k>`)."""
    table = manifest.read(workdir / "results" / "manifest.tsv")

    def chunked(studies: list[str], prefix: str = "") -> dict[str, list[str]]:
        return {
            f"{prefix}chunk-{k}": studies[start : start + per_job]
            for k, start in enumerate(range(0, len(studies), per_job))
        }

    test = sorted(table.loc[table["split"] == "test", "study_id"])
    if DEFAULT_FOLDS == 1:
        return {"val": chunked(sorted(table.loc[table["split"] == "val", "study_id"])),
                "test": chunked(test)}  # fmt: skip
    out_of_fold = {}
    for fold in range(DEFAULT_FOLDS):
        studies = sorted(table.loc[table["fold"] == str(fold), "study_id"])
        out_of_fold.update(chunked(studies, f"{names.fold_folder(fold)}-"))
    return {names.OUT_OF_FOLD: out_of_fold, "test": chunked(test)}


def test_inference_of_the_collection_is_spread_over_chunk_jobs(tmp_path):
    """1,014 studies (bench/scale.py's manifest) under the default config: each model's
    evaluation inference (out of fold, or val without cross-validation) and test inference are
    at least 16 jobs of at most 12 (`infer.studies_per_job`) consecutive sorted studies, which
    cover each split once; each evaluate job reads every chunk of its model and split."""
    spec = importlib.util.spec_from_file_location("scale", ROOT / "bench" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    shutil.copytree(ROOT / "config", tmp_path / "config")
    scale.write_manifest(tmp_path, 1014, folds=DEFAULT_FOLDS)
    expected = expected_chunks(tmp_path, 12)
    assert {split: sum(map(len, chunks.values())) for split, chunks in expected.items()} == {
        names.eval_splits(DEFAULT_FOLDS)[0]: 811 if DEFAULT_FOLDS > 1 else 197,
        "test": 203,
    }

    output = default_config_snakemake(tmp_path, "--dry-run")

    chunks = planned_chunks(output)
    assert chunks == {(model, split): expected[split] for model in MODELS for split in expected}
    assert all(len(jobs) >= 16 for jobs in chunks.values())
    evaluated = evaluated_predictions(output)
    for model in MODELS:
        for split, split_chunks in expected.items():
            assert evaluated[f"results/metrics/{model}/{split}_summary.csv"] == [
                f"results/predictions/{model}/{split}/{chunk}" for chunk in split_chunks
            ]


def test_default_run_infers_each_split_in_one_job(tmp_path):
    """The default cohort fits one chunk per split and fold (no more than 12 studies in each):
    one infer job per model and fold out of fold and one per model for the test split's fold
    ensemble (starting torch and loading models cost more than a study on a CPU)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    default_config_snakemake(tmp_path, "results/manifest.tsv")
    expected = expected_chunks(tmp_path, 12)
    assert {split: len(chunks) for split, chunks in expected.items()} == {
        names.eval_splits(DEFAULT_FOLDS)[0]: DEFAULT_FOLDS,
        "test": 1,
    }

    chunks = planned_chunks(default_config_snakemake(tmp_path, "--dry-run"))

    assert chunks == {(model, split): expected[split] for model in MODELS for split in expected}


def test_an_added_seed_trains_and_predicts_that_seed_only(run):
    """A seed added to one variant: its fold models train, predict and are evaluated, and the
    report is rebuilt; nothing of the other models reruns (with the report as the only target,
    Snakemake ran nothing at all: the new metrics were missing files no target asked for)."""
    cohort = Cohort.of(run)
    variants = yaml.safe_load((run / "tiny.yaml").read_text())["train"]["variants"]
    stepwise = variants["stepwise"]
    change = {"train": {"variants": {"stepwise": {**stepwise, "seeds": [*stepwise["seeds"], 7]}}}}
    assert planned_jobs(run, change) == {
        "train": cohort.folds,
        "infer": infer_jobs(cohort, 1),
        "gate": 1,  # a stepwise seed: its gated variant too
        "evaluate": evaluate_jobs(2),
        "report": 1,
    }


def test_studies_per_job_rechunks_every_inference(run):
    """2 studies per infer job on the tiny run: its 3-study split becomes 2 chunks; every model's
    inference reruns (the setting is part of the infer params), then its evaluation and the
    report; the threshold baseline's per-study predictions stay."""
    cohort = Cohort.of(run)
    table = manifest.read(run / "results" / "manifest.tsv")
    if TINY_FOLDS == 1:
        table = table[table["split"] != "train"]
    # each fold (test: fold "") or split: the studies of one model's or ensemble's infer jobs
    sizes = table.groupby(table["fold"] if TINY_FOLDS > 1 else table["split"]).size().tolist()
    chunks = sum(-(-size // 2) for size in sizes)
    assert chunks > len(sizes)  # at least one split or fold holds more than 2 studies
    change = {"infer": {"studies_per_job": 2}}
    assert planned_jobs(run, change) == {
        "infer": cohort.trained * chunks,
        "gate": cohort.gated,
        "evaluate": evaluate_jobs(cohort.trained + cohort.gated),
        "report": 1,
    }
