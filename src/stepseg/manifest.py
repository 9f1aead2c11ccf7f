"""The study manifest: one row per study, with its patient, split and series.

Splits are drawn per patient, never per study, so that follow-up studies of one patient cannot
sit on both sides of the train/test line. Patients are stratified by whether any of their studies
has lesions, so that small cohorts still get lesions in every split.
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
    records: Iterable[Mapping[str, object]], fractions: Mapping[str, float], seed: int
) -> pd.DataFrame:
    """Return the records as a manifest table with a `split` column assigned per patient.

    Each record needs `study_id`, `patient_id` and `has_lesions`; series columns are kept as given.
    """
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
    for _, patients in sorted(patient_lesions.groupby(patient_lesions), key=lambda kv: kv[0]):
        ids = sorted(patients.index)
        rng.shuffle(ids)
        counts = _largest_remainder(len(ids), weights)
        start = 0
        for split, count in zip(SPLITS, counts, strict=True):
            for patient in ids[start : start + count]:
                split_of[patient] = split
            start += count
    table["split"] = table["patient_id"].map(split_of)
    table["has_lesions"] = table["has_lesions"].astype(bool)
    return table[COLUMNS + [c for c in table.columns if c not in COLUMNS]].sort_values(
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
