import pandas as pd
import pytest

from stepseg import manifest

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def cohort(n_patients: int, repeats: int = 2) -> list[dict]:
    records = []
    for p in range(n_patients):
        for s in range(1 + (p % repeats == 0)):
            records.append(
                {"study_id": f"P{p:03d}_{s}", "patient_id": f"P{p:03d}", "has_lesions": p % 2 == 0}
            )
    return records


def test_no_patient_crosses_splits_and_every_split_has_lesions():
    table = manifest.assign_splits(cohort(40), FRACTIONS, seed=3)
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    for split in manifest.SPLITS:
        assert table[(table["split"] == split)]["has_lesions"].any(), split
    patients = table.drop_duplicates("patient_id")["split"].value_counts()
    assert patients.to_dict() == {"train": 24, "val": 8, "test": 8}


def test_split_is_deterministic_and_seed_dependent():
    a = manifest.assign_splits(cohort(30), FRACTIONS, seed=1)
    b = manifest.assign_splits(cohort(30), FRACTIONS, seed=1)
    c = manifest.assign_splits(cohort(30), FRACTIONS, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])


def test_round_trip_keeps_types(tmp_path):
    table = manifest.assign_splits(cohort(10), FRACTIONS, seed=0)
    manifest.write(table, tmp_path / "manifest.tsv")
    back = manifest.read(tmp_path / "manifest.tsv")
    assert back["has_lesions"].dtype == bool
    assert back["study_id"].tolist() == table["study_id"].tolist()
    assert list(back.columns[: len(manifest.COLUMNS)]) == manifest.COLUMNS


def test_duplicate_study_ids_are_refused():
    records = [*cohort(3), {"study_id": "P000_0", "patient_id": "P999", "has_lesions": False}]
    with pytest.raises(ValueError, match="duplicate study ids in the cohort: \\['P000_0'\\]"):
        manifest.assign_splits(records, FRACTIONS, seed=0)
