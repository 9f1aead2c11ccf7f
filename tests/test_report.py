import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stepseg import metrics, nifti, report
from stepseg.settings import EvaluateSettings, ReportSettings

REPO = Path(__file__).resolve().parents[1]
SHAPE = (20, 10, 16)  # (z, y, x)
AFFINE = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS-stored like DICOM-derived files: 12 ml voxels
VOXEL_ML = 0.012
STUDIES = {"val": ["V1", "V2"], "test": ["T1", "T2", "T3", "T4"]}
TRAINED = ["stepwise-seed0", "stepwise-seed1", "plain-seed0"]
VARIANTS = [*TRAINED, "threshold"]
# one training job per trained model without cross-validation: its fold 0
FOLD_MODELS = {f"{v}-fold0": v for v in TRAINED}


def lesion_volume(study: str) -> np.ndarray:
    gt = np.zeros(SHAPE, dtype=np.uint8)
    if study != "T4":  # T4: no lesions
        gt[4:8, 3:6, 4:8] = 1  # 48 voxels
        gt[14:16, 5:7, 10:12] = 1  # 8 voxels
    return gt


def prediction(variant: str, study: str) -> np.ndarray:
    """Deterministic, different quality per variant and study."""
    gt = lesion_volume(study)
    pred = np.zeros_like(gt)
    quality = {"stepwise-seed0": 3, "stepwise-seed1": 2, "plain-seed0": 1, "threshold": 0}[variant]
    index = int(study[1])
    if study != "T4":
        pred[4 : 4 + min(4, quality + index // 2 + 1), 3:6, 4:8] = 1  # part of the big lesion
    if quality < 2:
        pred[1:3, 1:3, 12:14] = 1  # a false positive blob
    return pred


def build_results(root: Path) -> dict[str, list[Path]]:
    """A results/ tree as the workflow leaves it: NIfTI, predictions, metrics, training logs."""
    suv = np.ones(SHAPE, dtype=np.float32)
    suv[4:8, 3:6, 4:8] = 8.0
    for split, studies in STUDIES.items():
        for study in studies:
            folder = root / "nifti" / study
            nifti.save(nifti.Volume(lesion_volume(study), AFFINE), folder / "SEG.nii.gz", np.uint8)
            nifti.save(nifti.Volume(suv, AFFINE), folder / "SUV.nii.gz", np.float32)
        for variant in VARIANTS:
            preds = []
            for study in studies:
                path = root / "predictions" / variant / split / f"{study}.nii.gz"
                nifti.save(nifti.Volume(prediction(variant, study), AFFINE), path, np.uint8)
                preds.append(path)
            metrics.evaluate_split(
                studies=studies,
                seg_paths=[root / "nifti" / s / "SEG.nii.gz" for s in studies],
                suv_paths=[root / "nifti" / s / "SUV.nii.gz" for s in studies],
                pred_paths=preds,
                per_study_csv=root / "metrics" / variant / f"{split}_per_study.csv",
                summary_csv=root / "metrics" / variant / f"{split}_summary.csv",
                settings=EvaluateSettings(connectivity=18),
            )
    for k, variant in enumerate(TRAINED):
        epochs = np.arange(1, 6)
        log = pd.DataFrame(  # the columns stepseg.train writes, plus one it might add
            {
                "epoch": epochs,
                "lr": 1e-3 * 0.5**epochs,
                "loss": 2.0 / epochs,
                "ch0_dicefocal": 1.0 / epochs,
                "ch1_mse": 0.05 / epochs + k,
                "ch2_mse": 0.02 / epochs,
                "s_ch0_dicefocal": np.linspace(1, 2, 5),
                "s_ch1_mse": np.linspace(1, 0.5, 5),
                "s_ch2_mse": np.linspace(1, 0.7, 5),
                "val_dice": [np.nan, np.nan, 0.3, np.nan, 0.6],  # validated every few epochs
                "seconds": np.full(5, 12.5),
                "note": ["warm-up"] * 5,  # non-numeric columns are ignored
            }
        )
        path = root / "models" / variant / "fold0" / "train_log.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        log.to_csv(path, index=False)
    return {
        "metrics_csvs": {
            (v, s): root / "metrics" / v / f"{s}_per_study.csv"
            for v in VARIANTS
            for s in ("val", "test")
        },
        "train_logs": {
            name: root / "models" / v / "fold0" / "train_log.csv" for name, v in FOLD_MODELS.items()
        },
        "test_images": {
            s: (root / "nifti" / s / "SUV.nii.gz", root / "nifti" / s / "SEG.nii.gz")
            for s in STUDIES["test"]
        },
        "test_predictions": {
            v: {s: root / "predictions" / v / "test" / f"{s}.nii.gz" for s in STUDIES["test"]}
            for v in VARIANTS
        },
    }


def outputs(root: Path, cases=("best", "median", "worst")) -> report.ReportOutputs:
    out = root / "report"
    return report.ReportOutputs(
        table=out / "results.csv",
        pairwise=out / "pairwise.csv",
        markdown=out / "results.md",
        html=out / "results.html",
        distributions=out / "per_study_metrics.png",
        learning_curves=out / "learning_curves.png",
        curves={name: out / "training" / f"{name}.png" for name in FOLD_MODELS},
        cases={c: out / "cases" / f"{c}.png" for c in cases},
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    inputs = build_results(root)
    outs = outputs(root)
    report.write_report(
        **inputs,
        outputs=outs,
        settings=ReportSettings(mip_cases=("best", "median", "worst"), figure_dpi=50),
        data_source="synthetic",
        folds=1,
    )
    return root, inputs, outs


def test_results_csv_holds_paper_rows_and_our_means(written):
    root, _, outs = written
    table = pd.read_csv(outs.table)
    paper = table[table["source"] == "paper"].set_index("split")
    assert paper.loc["val", ["dice", "fpv_ml", "fnv_ml"]].tolist() == [0.80, 1.87, 1.14]
    assert paper.loc["test", ["dice", "fpv_ml", "fnv_ml"]].tolist() == [0.92, 0.89, 0.53]
    assert paper.loc["test", "set"] == "Preliminary test set"
    ours = table[table["source"] == "ours"].set_index(["variant", "split"])
    assert len(ours) == len(VARIANTS) * 2
    summary = pd.read_csv(root / "metrics" / "plain-seed0" / "test_summary.csv").iloc[0]
    row = ours.loc[("plain-seed0", "test")]
    for column in ("dice", "fpv_ml", "fnv_ml", "tp_lesions", "tlg_pred"):
        assert row[column] == pytest.approx(summary[column], rel=1e-12)
    assert (row["n_studies"], row["n_lesion_studies"]) == (4, 3)
    assert (row["model"], row["seed"]) == ("plain", 0)
    assert ours.loc[("threshold", "val"), "data"] == "our synthetic val split"


def test_hand_checked_dice_of_one_study(written):
    """plain-seed0 on T1: 2 of the 4 slabs of the 48-voxel lesion (24 voxels), the 8-voxel lesion
    missed, and an 8-voxel false positive blob."""
    root, _, _ = written
    table = pd.read_csv(root / "metrics" / "plain-seed0" / "test_per_study.csv")
    t1 = table.set_index("study").loc["T1"]
    assert t1["dice"] == pytest.approx(2 * 24 / (56 + 24 + 8), abs=1e-12)
    assert t1["fnv_ml"] == pytest.approx(8 * VOXEL_ML, rel=1e-6)
    assert t1["fpv_ml"] == pytest.approx(8 * VOXEL_ML, rel=1e-6)
    assert (t1["tp_lesions"], t1["fn_lesions"], t1["fp_lesions"]) == (1, 1, 1)


def test_markdown_table1_and_ablation(written):
    root, _, outs = written
    text = outs.markdown.read_text()
    assert (
        "| Validation set | Liu et al. 2022 (paper): their validation set of 40 patients " in text
    )
    assert "| 0.80 | 1.87 | 1.14 | n/a |" in text
    assert "| 0.92 | 0.89 | 0.53 | n/a |" in text
    assert "ours: stepwise-seed0, our synthetic test split (not the challenge's test set)" in text
    summaries = {v: pd.read_csv(root / "metrics" / v / "val_summary.csv").iloc[0] for v in VARIANTS}
    dice = np.array([summaries[v]["dice"] for v in ("stepwise-seed0", "stepwise-seed1")])
    expected = f"| stepwise | Validation set | 2 | {dice.mean():.3f} ± {dice.std(ddof=1):.3f} |"
    assert expected in text
    threshold = summaries["threshold"]["dice"]
    assert f"| threshold | Validation set | 1 | {threshold:.3f} |" in text
    for figure in ("per_study_metrics.png", "training/plain-seed0-fold0.png", "cases/worst.png"):
        assert f"]({figure})" in text
    # val Dice: stepwise's seeds 0.923 and 0.853 (mean 0.888) against plain's 0.633
    assert "Best variant: stepwise, the highest Dice on the val split (its seeds averaged)" in text
    assert "test studies of stepwise-seed0, its model with the highest val Dice" in text
    rows = markdown_section(
        text, "Pairwise comparison of the trained variants (seeds averaged per study)"
    )
    assert [(r["Variants (A - B)"], r["Set"], r["Metric"]) for r in rows] == [
        ("stepwise - plain", split, metric)
        for split in ("Validation set", "Preliminary test set", "Pooled (every evaluated study)")
        for metric in ("DSC", "False Positive (ml)", "False Negative (ml)")
    ]
    pairwise = pd.read_csv(outs.pairwise)
    assert pairwise.columns.tolist() == report.PAIRWISE_COLUMNS
    assert len(pairwise) == 9 and set(pairwise["variant_a"] + "-" + pairwise["variant_b"]) == {
        "stepwise-plain"
    }


# Per-study (dice, fpv_ml, fnv_ml) with FPV and FNV different in every row of Table 1; T3 has
# no lesions (Dice and FNV undefined). Means by hand under TABLE1.
DISTINCT = {
    "val": {
        "stepwise-seed0": [(0.9, 0.5, 0.25), (0.8, 1.5, 0.75)],
        "plain-seed0": [(0.6, 2.0, 0.5), (0.4, 4.0, 1.5)],
        "threshold": [(0.3, 6.0, 2.0), (0.1, 8.0, 4.0)],
    },
    "test": {
        "stepwise-seed0": [(0.95, 0.2, 0.1), (0.85, 0.4, 0.3), (np.nan, 0.9, np.nan)],
        "plain-seed0": [(0.7, 1.0, 0.6), (0.5, 2.0, 1.0), (np.nan, 6.0, np.nan)],
        "threshold": [(0.2, 10.0, 5.0), (0.3, 12.0, 7.0), (np.nan, 14.0, np.nan)],
    },
}
TABLE1_COLUMNS = [
    "Set",
    "Result",
    "DSC",
    "False Positive (ml)",
    "False Negative (ml)",
    "False Positive in lesion-free studies (ml)",
    "Studies (with lesions)",
]
TABLE1 = {  # (set, result): DSC, FPV, FNV, FPV of the lesion-free studies (T3), studies
    ("Validation set", "Liu et al. 2022 (paper): their validation set of 40 patients"): (
        "0.80", "1.87", "1.14", "n/a", "n/a"),
    ("Validation set", "ours: plain-seed0, our synthetic val split"): (
        "0.500", "3.00", "1.00", "n/a", "2 (2)"),
    ("Validation set", "ours: stepwise-seed0, our synthetic val split"): (
        "0.850", "1.00", "0.50", "n/a", "2 (2)"),
    ("Validation set", "ours: threshold, our synthetic val split"): (
        "0.200", "7.00", "3.00", "n/a", "2 (2)"),
    ("Preliminary test set",
     "Liu et al. 2022 (paper): the autoPET 2022 challenge's preliminary test set"): (
        "0.92", "0.89", "0.53", "n/a", "n/a"),
    ("Preliminary test set",
     "ours: plain-seed0, our synthetic test split (not the challenge's test set)"): (
        "0.600", "3.00", "0.80", "6.00", "3 (2)"),
    ("Preliminary test set",
     "ours: stepwise-seed0, our synthetic test split (not the challenge's test set)"): (
        "0.900", "0.50", "0.20", "0.90", "3 (2)"),
    ("Preliminary test set",
     "ours: threshold, our synthetic test split (not the challenge's test set)"): (
        "0.250", "12.00", "6.00", "14.00", "3 (2)"),
}  # fmt: skip


def markdown_section(text: str, title: str) -> list[dict[str, str]]:
    """The rows of the Markdown table under `## {title}`, each as {column header: cell}."""
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    header, rule, *rows = [line for line in section.splitlines() if line.startswith("|")]
    assert set(rule) <= {"|", "-"}
    cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in [header, *rows]]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[1:]]


def test_markdown_table1_puts_each_value_under_its_header(tmp_path):
    """Table 1 read back from results.md's text (`markdown_page`) by column header, with FPV
    and FNV distinct in every row: a table whose FPV and FNV columns are swapped fails."""
    metrics_csvs = {}
    for split, by_variant in DISTINCT.items():
        for variant, values in by_variant.items():
            path = tmp_path / variant / f"{split}_per_study.csv"
            path.parent.mkdir(exist_ok=True)
            frame = pd.DataFrame(values, columns=["dice", "fpv_ml", "fnv_ml"])
            frame.insert(0, "study", [f"{split[0].upper()}{k + 1}" for k in range(len(values))])
            frame.insert(1, "has_lesions", frame["dice"].notna())
            for column in metrics.PER_STUDY_COLUMNS[5:]:
                frame[column] = 1.0
            frame.to_csv(path, index=False)
            metrics_csvs[(variant, split)] = path
    tables = report.compute_tables(
        report.load_per_study(metrics_csvs), cases=["best"], data_source="synthetic"
    )
    page = report.markdown_page(
        report.text_tables(tables, "synthetic"), report.report_notes(tables, "synthetic", 1), []
    )
    rows = markdown_section(page, "Table 1 layout: the paper's numbers and ours")
    assert [list(row) for row in rows] == [TABLE1_COLUMNS] * len(TABLE1)
    assert {(row["Set"], row["Result"]): tuple(row.values())[2:] for row in rows} == TABLE1
    assert [(row["Set"], row["Result"]) for row in rows] == list(TABLE1)


def test_html_table_is_standalone(written):
    _, _, outs = written
    page = outs.html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table" in page
    assert "Liu et al. 2022 (paper): the autoPET 2022 challenge's preliminary test set" in page


def test_every_figure_is_a_png(written):
    _, _, outs = written
    figures = [
        outs.distributions,
        outs.learning_curves,
        *outs.curves.values(),
        *outs.cases.values(),
    ]
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert figure.stat().st_size > 2000


def test_paired_comparison_by_hand():
    """Seeds averaged per study, then stepwise - plain: Dice differences 0.1, 0.2, 0.3 on the
    three lesion studies: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 -> half-width 0.248414; all
    three positive: exact two-sided Wilcoxon p = 2 / 2^3 = 0.25."""
    studies = ["A", "B", "C", "D"]
    plain = [0.5, 0.4, 0.3, np.nan]  # D: lesion-free, Dice undefined
    rows = []
    for variant, dice in [
        ("stepwise-seed0", [0.5, 0.5, 0.5, np.nan]),
        ("stepwise-seed1", [0.7, 0.7, 0.7, np.nan]),  # seed mean 0.6
        ("plain-seed0", plain),
        ("threshold", [0.0, 0.0, 0.0, np.nan]),
    ]:
        for study, value in zip(studies, dice, strict=True):
            rows.append(
                {"variant": variant, "split": "test", "study": study, "dice": value,
                 "fpv_ml": 1.0 if variant.startswith("stepwise") else 2.0, "fnv_ml": value}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    paired = report.paired_comparison(frame, "stepwise", "plain", "test").set_index("metric")
    dice = paired.loc["dice"]
    assert dice["n_studies"] == 3
    assert dice["mean_difference"] == pytest.approx(0.2)
    assert dice["ci_high"] - dice["mean_difference"] == pytest.approx(0.248414, abs=1e-6)
    assert dice["wilcoxon_p"] == pytest.approx(0.25)
    assert dice["conclusion"] == "no difference at 95 %"  # interval [-0.048, 0.448]
    fpv = paired.loc["fpv_ml"]
    assert (fpv["n_studies"], fpv["mean_difference"]) == (4, -1.0)
    assert fpv["conclusion"] == "stepwise better"  # 1 ml less on every study: lower is better
    assert report.paired_comparison(frame, "stepwise", "nnunet", "test").empty
    assert report.paired_comparison(frame, "stepwise", "plain", "val").empty


def test_best_variant_and_cases_are_ranked_by_hand():
    per_study = pd.DataFrame(
        {
            "study": ["A", "B", "C", "D", "E"],
            "has_lesions": [True, True, True, False, True],
            "dice": [0.5, 0.9, 0.1, np.nan, 0.5],
            "fpv_ml": [1.0, 0.0, 3.0, 9.0, 0.5],
            "fnv_ml": [1.0, 0.0, 3.0, np.nan, 0.5],
        }
    )
    # by Dice: B 0.9, then E before A (same Dice, less FPV + FNV), then C; D has no lesions
    assert report.pick_cases(per_study, ["best", "median", "worst"]) == {
        "best": "B",
        "median": "E",
        "worst": "C",
    }
    no_lesions = per_study.assign(has_lesions=False)
    assert report.pick_cases(no_lesions, ["best", "worst"]) == {"best": "B", "worst": "D"}
    with pytest.raises(ValueError, match="unknown mip_cases"):
        report.pick_cases(per_study, ["typical"])

    ablation = pd.DataFrame(
        {
            "model": ["a", "b", "c", "a"],
            "split": ["val", "val", "val", "test"],
            "dice_mean": [0.7, 0.7, np.nan, 0.99],
            "fpv_ml_mean": [2.0, 1.0, 0.0, 0.0],
        }
    )
    assert report.best_variant(ablation, "val") == "b"  # tie on Dice, less FPV; test ignored


def per_study_frame(values: dict[str, dict[str, list[tuple[float, float, float]]]]) -> pd.DataFrame:
    """A `load_per_study` frame from {split: {variant: [(dice, fpv_ml, fnv_ml) per study]}};
    studies `<split>1`, `<split>2`, ..., lesion-free where Dice is undefined; the other
    metric columns 1.0."""
    frames = []
    for split, by_variant in values.items():
        for variant, rows in by_variant.items():
            frame = pd.DataFrame(rows, columns=["dice", "fpv_ml", "fnv_ml"])
            frame.insert(0, "study", [f"{split}{k + 1}" for k in range(len(rows))])
            frame.insert(1, "has_lesions", frame["dice"].notna())
            for column in metrics.PER_STUDY_COLUMNS[5:]:
                frame[column] = 1.0
            frames.append(frame.assign(variant=variant, split=split))
    return pd.concat(frames, ignore_index=True)


# Three variants named neither stepwise nor plain, two seeds each. On test, per study with the
# seeds averaged: alpha Dice 0.4 0.6 0.5 0.7 0.8, beta 0.3 0.4 0.2 0.3 0.3 (test6 lesion-free);
# alpha's FPV 1, 2, 1, 2, 1, 2 ml above beta's; FNV equal.
BETA_DICE = [0.3, 0.4, 0.2, 0.3, 0.3]
ALPHA_DICE = [0.4, 0.6, 0.5, 0.7, 0.8]
THREE = {
    "val": {
        "alpha-seed0": [(0.5, 1.0, 1.0), (0.6, 1.0, 1.0), (0.7, 1.0, 1.0)],
        "alpha-seed1": [(0.7, 1.0, 1.0), (0.6, 1.0, 1.0), (0.5, 1.0, 1.0)],
        "beta-seed0": [(0.4, 2.0, 1.0), (0.5, 1.0, 1.0), (0.3, 3.0, 1.0)],
        "beta-seed1": [(0.6, 2.0, 1.0), (0.5, 3.0, 1.0), (0.3, 1.0, 1.0)],
        "gamma-seed0": [(0.2, 0.5, 0.5), (0.1, 0.5, 0.5), (0.3, 0.5, 0.5)],
        "gamma-seed1": [(0.2, 0.5, 0.5), (0.3, 0.5, 0.5), (0.1, 0.5, 0.5)],
        "threshold": [(0.1, 9.0, 2.0), (0.1, 9.0, 2.0), (0.1, 9.0, 2.0)],
    },
    "test": {
        "alpha-seed0": [(d - 0.05, 2.0 + k % 2, 1.0) for k, d in enumerate(ALPHA_DICE)]
        + [(np.nan, 2.0, np.nan)],
        "alpha-seed1": [(d + 0.05, 2.0 + k % 2, 1.0) for k, d in enumerate(ALPHA_DICE)]
        + [(np.nan, 4.0, np.nan)],
        "beta-seed0": [(d - 0.1, 1.5, 1.0) for d in BETA_DICE] + [(np.nan, 1.5, np.nan)],
        "beta-seed1": [(d + 0.1, 0.5, 1.0) for d in BETA_DICE] + [(np.nan, 0.5, np.nan)],
        "gamma-seed0": [(0.5, 1.0, 0.5), (0.4, 1.0, 0.5), (0.6, 1.0, 0.5), (0.2, 1.0, 0.5),
                        (0.3, 1.0, 0.5), (np.nan, 1.0, np.nan)],
        "gamma-seed1": [(0.3, 1.0, 0.5), (0.4, 1.0, 0.5), (0.2, 1.0, 0.5), (0.2, 1.0, 0.5),
                        (0.5, 1.0, 0.5), (np.nan, 1.0, np.nan)],
        "threshold": [(0.1, 9.0, 2.0)] * 5 + [(np.nan, 9.0, np.nan)],
    },
}  # fmt: skip


def test_pairwise_compares_every_two_configured_variants_by_hand():
    """alpha, beta and gamma (not stepwise and plain) get all three pairs on both splits, the
    untrained threshold none. alpha - beta on test, seeds averaged per study: Dice differences
    0.1, 0.2, 0.3, 0.4, 0.5: mean 0.3, sd sqrt(0.025) = 0.158114, t(0.975, 4) = 2.776445 ->
    half-width 0.196324, interval [0.103676, 0.496324]; all five positive: exact two-sided
    Wilcoxon p = 2 / 2^5 = 0.0625. FPV differences 1, 2, 1, 2, 1, 2 over all six studies (the
    lesion-free one too): mean 1.5, sd 0.547723, t(0.975, 5) = 2.570582 -> half-width 0.574800:
    beta better, lower FPV."""
    tables = report.compute_tables(per_study_frame(THREE), cases=["best"], data_source="synthetic")
    pairwise = tables.pairwise
    compared = zip(pairwise["variant_a"], pairwise["variant_b"], pairwise["split"], strict=True)
    assert list(dict.fromkeys(compared)) == [
        ("alpha", "beta", "val"), ("alpha", "beta", "test"), ("alpha", "beta", "pooled"),
        ("alpha", "gamma", "val"), ("alpha", "gamma", "test"), ("alpha", "gamma", "pooled"),
        ("beta", "gamma", "val"), ("beta", "gamma", "test"), ("beta", "gamma", "pooled"),
    ]  # fmt: skip
    assert len(pairwise) == 9 * 3
    rows = pairwise.set_index(["variant_a", "variant_b", "split", "metric"])
    dice = rows.loc[("alpha", "beta", "test", "dice")]
    assert dice["n_studies"] == 5
    assert dice["mean_difference"] == pytest.approx(0.3, abs=1e-12)
    assert dice["ci_low"] == pytest.approx(0.103676, abs=1e-6)
    assert dice["ci_high"] == pytest.approx(0.496324, abs=1e-6)
    assert dice["wilcoxon_p"] == pytest.approx(0.0625, abs=1e-12)
    assert dice["conclusion"] == "alpha better"
    fpv = rows.loc[("alpha", "beta", "test", "fpv_ml")]
    assert fpv["n_studies"] == 6
    assert fpv["mean_difference"] == pytest.approx(1.5, abs=1e-12)
    assert fpv["ci_low"] == pytest.approx(1.5 - 0.574800, abs=1e-6)
    assert fpv["conclusion"] == "beta better"
    fnv = rows.loc[("alpha", "beta", "test", "fnv_ml")]
    assert (fnv["n_studies"], fnv["mean_difference"], fnv["conclusion"]) == (
        5, 0.0, "no difference at 95 %")  # fmt: skip
    # pooled: the val and test studies' seed-averaged differences together, one per study
    differences = []
    for split in ("val", "test"):
        seeds = {
            name: np.mean([[d for d, _, _ in THREE[split][f"{name}-seed{k}"]] for k in (0, 1)], 0)
            for name in ("alpha", "beta")
        }
        differences += [
            a - b for a, b in zip(seeds["alpha"], seeds["beta"], strict=True) if not np.isnan(a)
        ]
    pooled = rows.loc[("alpha", "beta", "pooled", "dice")]
    half = stats.t.ppf(0.975, len(differences) - 1) * np.std(differences, ddof=1)
    assert pooled["n_studies"] == len(differences) == 5 + len(THREE["val"]["alpha-seed0"])
    assert pooled["mean_difference"] == pytest.approx(np.mean(differences), abs=1e-12)
    assert pooled["ci_high"] - pooled["ci_low"] == pytest.approx(
        2 * half / np.sqrt(len(differences)), abs=1e-12
    )

    page = report.markdown_page(
        report.text_tables(tables, "synthetic"), report.report_notes(tables, "synthetic", 1), []
    )
    shown = markdown_section(
        page, "Pairwise comparison of the trained variants (seeds averaged per study)"
    )
    assert {row["Variants (A - B)"] for row in shown} == {
        "alpha - beta",
        "alpha - gamma",
        "beta - gamma",
    }
    assert {
        "Variants (A - B)": "alpha - beta",
        "Set": "Preliminary test set",
        "Metric": "DSC",
        "Studies": "5",
        "Mean A - B": "0.300",
        "95 % t-interval": "[0.104, 0.496]",
        "Wilcoxon p": "0.062",
        "Conclusion": "alpha better",
    } in shown


def test_best_variant_is_chosen_on_validation_never_on_test():
    """On val, beta's seeds average highest (0.6 against alpha's 0.5 and gamma's 0.55), although
    alpha-seed0 is the best single model; on test alpha wins and beta is last. The choice (and
    beta's seed for the cases, seed1 by val) stays beta's whatever the test numbers are."""
    values = {
        "val": {
            "alpha-seed0": [(0.9, 1.0, 1.0)], "alpha-seed1": [(0.1, 1.0, 1.0)],
            "beta-seed0": [(0.5, 1.0, 1.0)], "beta-seed1": [(0.7, 1.0, 1.0)],
            "gamma-seed0": [(0.55, 1.0, 1.0)], "gamma-seed1": [(0.55, 1.0, 1.0)],
        },
        "test": {
            "alpha-seed0": [(0.9, 1.0, 1.0), (0.8, 1.0, 1.0)],
            "alpha-seed1": [(0.9, 1.0, 1.0), (0.8, 1.0, 1.0)],
            "beta-seed0": [(0.3, 1.0, 1.0), (0.2, 1.0, 1.0)],
            "beta-seed1": [(0.1, 1.0, 1.0), (0.2, 1.0, 1.0)],
            "gamma-seed0": [(0.6, 1.0, 1.0), (0.5, 1.0, 1.0)],
            "gamma-seed1": [(0.6, 1.0, 1.0), (0.5, 1.0, 1.0)],
        },
    }  # fmt: skip
    per_study = per_study_frame(values)
    tables = report.compute_tables(per_study, cases=["best", "worst"], data_source="synthetic")
    assert (tables.selection, tables.best, tables.best_model) == ("val", "beta", "beta-seed1")
    assert tables.cases == {"best": "test2", "worst": "test1"}  # beta-seed1: 0.2, 0.1
    note = report.report_notes(tables, "synthetic", 1)[2]
    assert note.startswith("Best variant: beta, the highest Dice on the val split")
    assert "On test: DSC 0.200 ± 0.071, " in note  # beta's seeds 0.25 and 0.15

    test = per_study["split"] == "test"
    for dice in (0.0, 1.0, np.nan):
        shuffled = per_study.assign(dice=per_study["dice"].where(~test, dice))
        again = report.compute_tables(shuffled, cases=["best"], data_source="synthetic")
        assert (again.best, again.best_model) == ("beta", "beta-seed1")


def test_selection_split_prefers_out_of_fold_and_never_takes_test():
    assert report.selection_split(["val", "test"]) == "val"
    assert report.selection_split(["test", "val", "oof"]) == "oof"
    with pytest.raises(ValueError, match=r"none of oof, val: .*\(test is never used to choose\)"):
        report.selection_split(["test"])


def test_cross_validated_metrics_are_chosen_on_out_of_fold_and_say_their_folds():
    """oof and test metrics (train.folds 2): the best variant is chosen out of fold, the paper's
    validation row stands beside our out-of-fold rows, and the notes name seeds and folds."""
    values = {
        "oof": {
            "alpha-seed0": [(0.4, 1.0, 1.0), (0.5, 1.0, 1.0)],
            "alpha-seed1": [(0.6, 1.0, 1.0), (0.5, 1.0, 1.0)],
            "beta-seed0": [(0.7, 1.0, 1.0), (0.6, 1.0, 1.0)],
        },
        "test": {
            "alpha-seed0": [(0.9, 1.0, 1.0)], "alpha-seed1": [(0.9, 1.0, 1.0)],
            "beta-seed0": [(0.1, 1.0, 1.0)],
        },
    }  # fmt: skip
    tables = report.compute_tables(per_study_frame(values), cases=["best"], data_source="synthetic")
    assert (tables.selection, tables.best, tables.best_model) == ("oof", "beta", "beta-seed0")
    paper = tables.results[tables.results["source"] == "paper"]
    assert paper[["split", "set", "dice", "fpv_ml", "fnv_ml"]].values.tolist() == [
        ["oof", "Out-of-fold", 0.80, 1.87, 1.14],
        ["test", "Preliminary test set", 0.92, 0.89, 0.53],
    ]
    assert set(tables.pairwise["split"]) == {"oof", "test", "pooled"}
    notes = report.report_notes(tables, "synthetic", 2)
    assert notes[2].startswith("Best variant: beta, the highest Dice on the oof split")
    assert notes[3].startswith(
        "Trained models: alpha seeds 0, 1; beta seeds 0; each seed 2 models, one per fold of a "
        "2-fold cross-validation (folds by patient, stratified by lesion status)."
    )
    assert report.report_notes(tables, "synthetic", 1)[3] == (
        "Trained models: alpha seeds 0, 1; beta seeds 0; one model per seed, trained on the "
        "train split and validated on the val split (no cross-validation: train.folds 1)."
    )


def test_ranking_weights_dice_half():
    summary = pd.DataFrame(
        {
            "variant": ["a", "b", "c"],
            "split": ["test"] * 3,
            "dice": [0.8, 0.7, 0.6],
            "fpv_ml": [3.0, 1.0, 2.0],
            "fnv_ml": [3.0, 1.0, 2.0],
        }
    )
    ranking = report.ranking_table(summary).set_index("variant")
    # a: 0.5*1 + 0.25*3 + 0.25*3 = 2.0; b: 0.5*2 + 0.25 + 0.25 = 1.5; c: 1.5 + 0.5 + 0.5 = 2.5
    assert ranking["score"].to_dict() == {"b": 1.5, "a": 2.0, "c": 2.5}
    assert ranking.index.tolist() == ["b", "a", "c"]


def test_training_log_columns_are_grouped_by_prefix():
    table = pd.DataFrame(
        {
            "epoch": [1],
            "lr": [0.1],
            "loss": [3.0],
            "ch0_dicefocal": [1.0],
            "ch1_mse": [2.0],
            "s_ch0_dicefocal": [1.0],
            "s_ch1_mse": [1.0],
            "val_dice": [""],
            "tag": ["x"],
        }
    )
    assert report._column_groups(table) == {
        "lr": ["lr"],
        "loss": ["loss"],
        "ch": ["ch0_dicefocal", "ch1_mse"],
        "s": ["s_ch0_dicefocal", "s_ch1_mse"],
    }


@pytest.mark.parametrize("stored", ["LPS", "RAS"])
def test_coronal_mip_puts_head_up_and_patient_right_on_the_left(stored):
    """A hot voxel at the patient's superior right must land top-left, however it is stored."""
    shape = (6, 4, 5)
    array = np.zeros(shape)
    sign = {"LPS": -1.0, "RAS": 1.0}[stored]
    affine = np.diag([sign, sign, 1.0, 1.0])
    # patient right: world x most positive -> LPS index 0 (x = -i), RAS index 4
    right_index = 0 if stored == "LPS" else 4
    array[5, 2, right_index] = 1  # z index 5 = most superior
    mip = report.coronal_mip(array, affine)
    assert mip.shape == (6, 5)
    assert np.argwhere(mip == 1).tolist() == [[0, 0]]


def test_metrics_of_a_split_that_is_not_evaluated_are_refused(tmp_path):
    bad = tmp_path / "threshold" / "train_per_study.csv"
    bad.parent.mkdir()
    pd.DataFrame({c: [] for c in metrics.PER_STUDY_COLUMNS}).to_csv(bad, index=False)
    with pytest.raises(
        ValueError, match=r"train_per_study.csv: split 'train' is not one of oof, val, test"
    ):
        report.load_per_study({("threshold", "train"): bad})


# ---- the real Snakemake report ---------------------------------------------------------------


def snakemake(workdir: Path, *args: str) -> tuple[int, str]:
    """Run Snakemake in `workdir`; returns the exit code and stdout + stderr."""
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "all", *args]
    run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


@pytest.mark.slow
def test_snakemake_report_rule_and_html_report(tmp_path):
    """The real report rule (workflow/rules/report.smk) under a stub of common.smk's helpers:
    it runs, `snakemake --report` embeds the table and every figure with its caption, and a
    report setting (not an evaluate setting) makes the report rule rerun."""
    build_results(tmp_path / "results")
    (tmp_path / "config.yaml").write_text(
        "download: {source: synthetic}\nevaluate: {connectivity: 18}\n"
        "report: {mip_cases: [best, worst], figure_dpi: 40}\n"
    )
    (tmp_path / "Snakefile").write_text(
        textwrap.dedent(
            f"""
            configfile: "config.yaml"
            report: "{REPO}/workflow/report/workflow.rst"
            from stepseg import names
            from stepseg.settings import ReportSettings
            EVAL_SPLITS = ["val", "test"]
            FOLDS = 1
            GATED = {{}}
            SETTINGS = {{"report": ReportSettings.from_mapping(config["report"])}}
            def studies(split):
                return {STUDIES!r}[split]
            def nifti_paths(name, split):
                return [f"results/nifti/{{s}}/{{name}}.nii.gz" for s in studies(split)]
            def trained_variants():
                return {TRAINED!r}
            def all_variants():
                return trained_variants() + ["threshold"]
            def prediction_paths(variant, split):
                return [f"results/predictions/{{variant}}/{{split}}/{{s}}.nii.gz"
                        for s in studies(split)]
            prediction_inputs = prediction_paths
            def train_logs():
                return {{f"{{t}}-fold0": f"results/models/{{t}}/fold0/train_log.csv"
                        for t in trained_variants()}}
            include: "{REPO}/workflow/rules/report.smk"
            rule all:
                input: rules.report.output
            """
        )
    )
    code, output = snakemake(tmp_path)
    assert code == 0, output[-3000:]
    assert (tmp_path / "results" / "report" / "cases" / "worst.png").is_file()
    assert not (tmp_path / "results" / "report" / "cases" / "median.png").exists()

    html_report = tmp_path / "report.html"
    code, output = snakemake(tmp_path, "--report", str(html_report))
    assert code == 0, output[-3000:]
    page = html_report.read_text()
    for name in (
        "results.html",
        "results.csv",
        "pairwise.csv",
        "per_study_metrics.png",
        "stepwise-seed1-fold0.png",
        "plain-seed0-fold0.png",
        "best.png",
        "worst.png",
    ):
        assert name in page, name
    for caption in (
        "Training log of one training job",
        "Per-study Dice",
        "coronal maximum-intensity",
        "Every two trained variants",
    ):
        assert caption in page, caption

    assert "Nothing to be done" in snakemake(tmp_path, "-n")[1]
    config = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(config.replace("connectivity: 18", "connectivity: 26"))
    assert "Nothing to be done" in snakemake(tmp_path, "-n")[1]  # not a report setting
    (tmp_path / "config.yaml").write_text(config.replace("figure_dpi: 40", "figure_dpi: 41"))
    dry = snakemake(tmp_path, "-n")[1]
    assert "rule report:" in dry and "Nothing to be done" not in dry


def test_a_gated_variant_is_compared_with_its_model_and_its_thresholds_are_named():
    """alpha_gated (alpha's predictions, gated) is compared like any variant, counted as no
    model of its own, and the notes give its thresholds as the gate record has them."""
    values = {
        split: {**by_variant, "alpha_gated-seed0": by_variant["alpha-seed0"]}
        for split, by_variant in THREE.items()
    }
    tables = report.compute_tables(per_study_frame(values), cases=["best"], data_source="synthetic")
    pairs = set(zip(tables.pairwise["variant_a"], tables.pairwise["variant_b"], strict=True))
    assert ("alpha", "alpha_gated") in pairs
    record = {
        "selection_split": "val",
        "threshold": 0.4871,
        "fold_thresholds": {"0": float("-inf")},
    }
    notes = report.report_notes(tables, "synthetic", 1, {"alpha_gated-seed0": record})
    assert "Trained models: alpha seeds 0, 1; beta seeds 0, 1; gamma seeds 0, 1; one model" in (
        "\n".join(notes)
    )
    assert notes[-1].endswith("Thresholds: alpha_gated-seed0: test 0.487, val by fold 0 -inf.")
