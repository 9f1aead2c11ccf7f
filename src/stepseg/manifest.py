"""The study manifest: one row per study, with its patient, split and series.

Splits are drawn per patient, never per study, so that follow-up studies of one patient cannot
sit on both sides of the train/test line. Patients are stratified by whether any of their studies
has lesions, so that small cohorts still get lesions in every split. With cross-validation
(`folds` >= 2) the non-test patients are dealt into folds the same way, by patient and stratified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from stepseg import names
from stepseg.atomic import atomic_file

SPLITS = names.SPLITS
COLUMNS = [
    "study_id",
    "patient_id",
    "split",
    "has_lesions",
    "ct_series",
    "pet_series",
    "seg_series",
]


def assign_splits(
    records: Iterable[Mapping[str, object]],
    fractions: Mapping[str, float],
    seed: int,
    folds: int = 1,
) -> pd.DataFrame:
    """Return the records as a manifest table with a `split` column assigned per patient.

    Each record needs `study_id`, `patient_id` and `has_lesions`; series columns are kept as given.
    With `folds` >= 2 the test patients are the same as with 1 (the same draw), every other
    patient's split is "train" and a `fold` column (after `split`; empty for test) holds its fold
    0..folds-1: within each lesion stratum the shuffled patients are dealt round robin, the next
    stratum continuing where the last stopped, so that fold sizes differ by at most one patient
    overall and per stratum. The `val` fraction then only sets how many patients are not test.
    """
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    table = pd.DataFrame(list(records))
    if table.empty:
        raise ValueError("the cohort has no studies")
    duplicates = _duplicates(table)
    if duplicates:
        raise ValueError(f"duplicate study ids in the cohort: {duplicates}")
    for column in COLUMNS:
        if column not in table:
            table[column] = ""
    weights = np.array([fractions[s] for s in SPLITS], dtype=float)
    if weights.sum() <= 0:
        raise ValueError("split fractions must not all be zero")
    weights /= weights.sum()

    rng = np.random.default_rng(seed)
    patient_lesions = table.groupby("patient_id")["has_lesions"].any()
    split_of: dict[str, str] = {}
    fold_of: dict[str, str] = {}
    dealt = 0  # non-test patients dealt into folds so far, over the strata
    for _, patients in sorted(patient_lesions.groupby(patient_lesions), key=lambda kv: kv[0]):
        ids = sorted(patients.index)
        rng.shuffle(ids)
        counts = _largest_remainder(len(ids), weights)
        start = 0
        for split, count in zip(SPLITS, counts, strict=True):
            for patient in ids[start : start + count]:
                split_of[patient] = split
            start += count
        if folds >= 2:  # the same draw, its non-test patients (train, then val) in folds
            for patient in ids[: len(ids) - counts[-1]]:
                split_of[patient] = "train"
                fold_of[patient] = str(dealt % folds)
                dealt += 1
    if folds > 1 and dealt < folds:  # an empty fold: a model without validation studies
        raise ValueError(f"{folds} folds but only {dealt} patients outside the test split")
    table["split"] = table["patient_id"].map(split_of)
    table["has_lesions"] = table["has_lesions"].astype(bool)
    columns = list(COLUMNS)
    if folds >= 2:
        table["fold"] = table["patient_id"].map(fold_of).fillna("")
        columns.insert(columns.index("split") + 1, "fold")
    return table[columns + [c for c in table.columns if c not in columns]].sort_values(
        "study_id", ignore_index=True
    )


def _duplicates(table: pd.DataFrame) -> str:
    """Each study id given to more than one record, with the patient ids (and study UIDs) of
    those records: ids are sanitised, so the raw patient ids show why they collide."""
    origin = [c for c in ("patient_id", "study_uid") if c in table]
    parts = []
    for study, rows in table[table["study_id"].duplicated(keep=False)].groupby("study_id"):
        records = [", ".join(f"{c} {row[c]!r}" for c in origin) for _, row in rows.iterrows()]
        parts.append(f"{study} from {' and '.join(records)}")
    return "; ".join(parts)


def _largest_remainder(n: int, weights: np.ndarray) -> list[int]:
    exact = weights * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def write(table: pd.DataFrame, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def read(path: str | Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    table["has_lesions"] = table["has_lesions"].map({"True": True, "False": False})
    return table
