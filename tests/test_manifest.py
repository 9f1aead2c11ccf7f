import pandas as pd
import pytest

from stepseg import manifest, sources

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


# cohort(12), seed 0, as assigned before cross-validation existed (main at 1dc2f7d)
SPLITS_BEFORE_FOLDS = {
    "P000_0": "val", "P000_1": "val", "P001_0": "val", "P002_0": "train", "P002_1": "train",
    "P003_0": "test", "P004_0": "train", "P004_1": "train", "P005_0": "train", "P006_0": "test",
    "P006_1": "test", "P007_0": "train", "P008_0": "train", "P008_1": "train", "P009_0": "train",
    "P010_0": "train", "P010_1": "train", "P011_0": "train",
}  # fmt: skip


def test_one_fold_keeps_the_split_as_it_was():
    """folds 1 writes the manifest of before: same splits, same columns, no fold column."""
    table = manifest.assign_splits(cohort(12), FRACTIONS, seed=0, folds=1)
    assert list(table.columns) == manifest.COLUMNS
    assert dict(zip(table["study_id"], table["split"], strict=True)) == SPLITS_BEFORE_FOLDS


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_deal_the_non_test_patients_by_patient_and_stratified(folds):
    """Test patients as with one fold; every other patient in exactly one fold (split train),
    all studies of a patient in it; per lesion stratum and overall the fold sizes (patients)
    differ by at most one."""
    one = manifest.assign_splits(cohort(40), FRACTIONS, seed=3)
    table = manifest.assign_splits(cohort(40), FRACTIONS, seed=3, folds=folds)
    assert list(table.columns) == [*manifest.COLUMNS[:3], "fold", *manifest.COLUMNS[3:]]
    test = table["split"] == "test"
    assert test.equals(one["split"] == "test")
    assert set(table.loc[test, "fold"]) == {""}
    assert set(table.loc[~test, "split"]) == {"train"}
    patients = table[~test].groupby("patient_id")
    assert patients["fold"].nunique().max() == 1
    dealt = patients.first()
    assert set(dealt["fold"]) == {str(f) for f in range(folds)}
    assert len(dealt) == (one["split"] != "test").groupby(one["patient_id"]).any().sum() == 32
    sizes = dealt["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    for _, stratum in dealt.groupby("has_lesions"):
        counts = stratum["fold"].value_counts().reindex(map(str, range(folds)), fill_value=0)
        assert counts.max() - counts.min() <= 1, counts.to_dict()
    assert table["fold"].equals(
        manifest.assign_splits(cohort(40), FRACTIONS, seed=3, folds=folds)["fold"]
    )
    assert not table["fold"].equals(
        manifest.assign_splits(cohort(40), FRACTIONS, seed=4, folds=folds)["fold"]
    )


def test_fold_column_round_trips_and_more_folds_than_patients_are_refused(tmp_path):
    table = manifest.assign_splits(cohort(10), FRACTIONS, seed=0, folds=2)
    manifest.write(table, tmp_path / "manifest.tsv")
    back = manifest.read(tmp_path / "manifest.tsv")
    assert back["fold"].tolist() == table["fold"].tolist()
    with pytest.raises(ValueError, match=r"^9 folds but only 8 patients outside the test split$"):
        manifest.assign_splits(cohort(10), FRACTIONS, seed=0, folds=9)


def test_duplicate_study_ids_are_refused_naming_where_each_came_from():
    records = [*cohort(3), {"study_id": "P000_0", "patient_id": "P 000", "has_lesions": False}]
    records = [{**r, "study_uid": f"1.2.{i}"} for i, r in enumerate(records)]
    with pytest.raises(ValueError) as error:
        manifest.assign_splits(records, FRACTIONS, seed=0)
    assert str(error.value) == (
        "duplicate study ids in the cohort: P000_0 from patient_id 'P000', study_uid '1.2.0' "
        "and patient_id 'P 000', study_uid '1.2.5'"
    )


TCIA_ROW = {
    "study_id": "PETCT_aaa_1",
    "patient_id": "PETCT_aaa",
    "split": "train",
    "has_lesions": True,
    "ct_series": "2.000000-CT-00001",
    "ct_series_uid": "1.2.3.1",
    "ct_series_images": "40",
    "study_uid": "1.2.3",
}
TCIA_SETTINGS = {
    "base_url": "http://127.0.0.1:1/",
    "collection": "FDG-PET-CT-Lesions",
    "patient_ids": ["PETCT_aaa"],
    "verify_md5": False,
    "timeout_s": 60,
    "max_attempts": 6,
    "backoff_s": 1.0,
    "cache_dir": "results/.partial/tcia",
}
FETCH_ONLY = {"verify_md5", "timeout_s", "max_attempts", "backoff_s", "cache_dir"}


def test_study_identity_is_the_row_without_split_and_lesion_status():
    """A tcia study's download reruns on new series, not on a new split or fold, clinical table
    or fetch setting: its identity is the manifest row without split, fold and has_lesions, no
    setting."""
    identity = sources.study_identity("tcia", TCIA_SETTINGS, TCIA_ROW)
    assert identity == {
        "row": {
            "ct_series": "2.000000-CT-00001",
            "ct_series_images": "40",
            "ct_series_uid": "1.2.3.1",
            "patient_id": "PETCT_aaa",
            "study_id": "PETCT_aaa_1",
            "study_uid": "1.2.3",
        },
        "settings": {},
    }
    moved = {**TCIA_ROW, "split": "test", "fold": "1", "has_lesions": False}
    slower = {**TCIA_SETTINGS, "timeout_s": 5, "max_attempts": 1, "verify_md5": True}
    assert sources.study_identity("tcia", slower, moved) == identity
    other_series = {**TCIA_ROW, "ct_series_uid": "1.2.3.9"}
    assert sources.study_identity("tcia", TCIA_SETTINGS, other_series) != identity


def test_listing_settings_leave_out_how_series_are_fetched():
    listing = sources.listing_settings("tcia", TCIA_SETTINGS)
    assert listing == {k: v for k, v in TCIA_SETTINGS.items() if k not in FETCH_ONLY}
    assert set(listing) == {"base_url", "collection", "patient_ids"}
    local = {"path": "/data/dicom", "link": "copy"}
    assert sources.listing_settings("dicom_dir", local) == local


@pytest.mark.parametrize(
    ("source", "settings", "shaping"),
    [
        # every generator setting enters every study's images or DICOM UIDs
        ("synthetic", {"seed": 7, "n_patients": 8, "pet_noise": 0.12}, None),
        ("dicom_dir", {"path": "/data/dicom", "link": "copy"}, {"link": "copy"}),
        ("nifti_dir", {"path": "/data/nifti"}, {}),
    ],
)
def test_study_identity_keeps_the_settings_that_shape_a_studys_files(source, settings, shaping):
    row = {"study_id": "P_1", "patient_id": "P", "split": "val", "has_lesions": False}
    identity = sources.study_identity(source, settings, row)
    assert identity == {
        "row": {"patient_id": "P", "study_id": "P_1"},
        "settings": settings if shaping is None else shaping,
    }


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match=r"unknown download\.source 'ftp'"):
        sources.study_identity("ftp", {}, {})
