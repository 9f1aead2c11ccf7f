"""The synthetic cohort: plan, determinism, DICOM content, truth consistency, lesion geometry.

A tiny geometry keeps each generated study well under a second.
"""

from __future__ import annotations

import re
import subprocess
import typing
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    PositronEmissionTomographyImageStorage,
    SegmentationStorage,
)

from stepseg import nifti
from stepseg.errors import StudyError
from stepseg.names import CT_PADDING_HU
from stepseg.settings import SyntheticSettings
from stepseg.synthetic import phantom, scanner, source
from stepseg.synthetic.plan import plan_cohort, settings_with_defaults

TINY = {
    "seed": 7,
    "n_patients": 12,
    "repeat_fraction": 0.25,
    "lesion_fraction": 0.5,
    "pet_shape": [48, 36, 36],
    "pet_spacing_mm": [12.0, 12.0, 12.0],
    "ct_shape": [60, 48, 48],
    "ct_spacing_mm": [10.0, 10.0, 10.0],
}
STUDY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SERIES = re.compile(r"\d+\.000000-[A-Za-z0-9._]+-\d{5}")


def _seconds(text: str) -> float:
    return int(text[:2]) * 3600 + int(text[2:4]) * 60 + float(text[4:])


def _bqml_per_suv(pet: pydicom.Dataset) -> float:
    """Body-weight SUV from the tags alone: dose decayed from injection to SeriesTime per gram."""
    drug = pet.RadiopharmaceuticalInformationSequence[0]
    elapsed = _seconds(pet.SeriesTime) - _seconds(drug.RadiopharmaceuticalStartTime)
    dose = float(drug.RadionuclideTotalDose) * 2 ** (-elapsed / float(drug.RadionuclideHalfLife))
    return dose / (float(pet.PatientWeight) * 1000.0)


def _fetch(tmp_path_factory: pytest.TempPathFactory, row: dict, name: str) -> Path:
    out = tmp_path_factory.mktemp(name)
    source.fetch_study(TINY, row, out)
    return out


def _read_series(study_dir: Path, folder: str) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted((study_dir / folder).glob("*.dcm"))]


def _by_z(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return source.list_studies(TINY)


@pytest.fixture(scope="module")
def lesion_row(rows: list[dict]) -> dict:
    return next(row for row in rows if row["has_lesions"])


@pytest.fixture(scope="module")
def empty_row(rows: list[dict]) -> dict:
    return next(row for row in rows if not row["has_lesions"])


@pytest.fixture(scope="module")
def lesion_study(tmp_path_factory: pytest.TempPathFactory, lesion_row: dict) -> Path:
    return _fetch(tmp_path_factory, lesion_row, "lesion")


@pytest.fixture(scope="module")
def empty_study(tmp_path_factory: pytest.TempPathFactory, empty_row: dict) -> Path:
    return _fetch(tmp_path_factory, empty_row, "empty")


# ---------------------------------------------------------------- plan


def test_plan_counts_ids_and_repeats(rows: list[dict]) -> None:
    n_repeat = round(0.25 * 12)
    assert len(rows) == 12 + n_repeat
    ids = [row["study_id"] for row in rows]
    assert len(set(ids)) == len(ids)
    assert all(STUDY_ID.fullmatch(i) for i in ids)
    assert sum(row["has_lesions"] for row in rows) == round(0.5 * len(rows))
    per_patient: dict[str, int] = {}
    for row in rows:
        per_patient[row["patient_id"]] = per_patient.get(row["patient_id"], 0) + 1
        assert row["study_id"].startswith(row["patient_id"] + "_")
        for column in ("ct_series", "pet_series", "seg_series"):
            assert SERIES.fullmatch(row[column]), row[column]
    assert sorted(per_patient.values()) == [1] * (12 - n_repeat) + [2] * n_repeat
    assert source.list_studies(TINY) == rows  # a pure function of the settings


def test_plan_patients_doses_times_and_lesions() -> None:
    plans = plan_cohort({**TINY, "n_patients": 40, "seed": 3})
    for plan in plans:
        assert 50.0 <= plan.weight_kg <= 110.0
        assert 150e6 <= plan.dose_bq <= 400e6
        assert 50 * 60 <= plan.uptake_s <= 80 * 60
        assert plan.has_lesions == (1 <= len(plan.lesions) <= 6)
        for lesion in plan.lesions:
            assert 0.5 <= lesion.volume_ml <= 60.0
            assert 2.5 <= lesion.suv_max <= 20.0
    by_id = {plan.study_id: plan for plan in plans}
    follow_ups = [plan for plan in plans if plan.visit == 2]
    assert follow_ups
    for plan in follow_ups:
        baseline = by_id[f"{plan.patient_id}_1"]
        assert plan.study_date > baseline.study_date
        assert plan.anatomy == baseline.anatomy
    regions = {lesion.region for plan in plans for lesion in plan.lesions}
    assert len(regions) >= 6


def test_follow_up_lesions_change() -> None:
    plans = plan_cohort({**TINY, "n_patients": 60, "lesion_fraction": 0.9})
    by_id = {plan.study_id: plan for plan in plans}
    pairs = [
        (by_id[f"{p.patient_id}_1"], p)
        for p in plans
        if p.visit == 2 and p.has_lesions and by_id[f"{p.patient_id}_1"].has_lesions
    ]
    assert pairs
    for baseline, follow_up in pairs:
        before = {lesion.center_mm: lesion.volume_ml for lesion in baseline.lesions}
        kept = [lesion for lesion in follow_up.lesions if lesion.center_mm in before]
        assert kept or len(follow_up.lesions) >= 1
        assert [before[lesion.center_mm] for lesion in kept] != [k.volume_ml for k in kept]


def test_lesion_volume_is_exact_on_a_fine_grid() -> None:
    """The analytic (lobulated) lesion encloses the planned volume: fine sampling within 2%."""
    plans = plan_cohort({**TINY, "n_patients": 20})
    lesions = [lesion for plan in plans for lesion in plan.lesions][:6]
    for lesion in lesions:
        reach = max(lesion.radii_mm) * 1.6
        step = min(lesion.radii_mm) / 12
        axes = [c + np.arange(-reach, reach, step) for c in lesion.center_mm]
        inside, suv = phantom.lesion_values(
            lesion, axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]
        )
        volume_ml = inside.sum() * step**3 / 1000.0
        assert volume_ml == pytest.approx(lesion.volume_ml, rel=0.02)
        assert suv[inside].max() <= lesion.suv_max + 1e-6
        assert not inside[[0, -1]].any()  # the bounding reach contains the whole lesion


def test_every_lesion_study_has_lesion_voxels_inside_the_body() -> None:
    """Rendered on the PET grid, a study has lesion voxels exactly when the plan says so, and
    lesions never reach into the air around the body."""
    settings = settings_with_defaults(TINY)
    for plan in plan_cohort(settings):
        geometry, shapes, uptake = source.scene(settings, plan)
        labels, suv, mask = phantom.render(
            geometry.pet, geometry.table_offset, shapes, plan.lesions, uptake
        )
        assert mask.any() == plan.has_lesions, plan.study_id
        assert np.all(labels[mask] == phantom.LABEL["lesion"])
        body, _, _ = phantom.render(geometry.pet, geometry.table_offset, shapes, (), None)
        assert not (mask & (body == phantom.LABEL["air"])).any()
        if plan.has_lesions:
            assert suv[mask].max() <= max(lesion.suv_max for lesion in plan.lesions) + 1e-5


@pytest.mark.parametrize("spacing", [(4.5, 4.5, 4.5), (3.0, 2.04, 2.04)])
def test_pet_noise_level_and_resolution(spacing: tuple[float, float, float]) -> None:
    """`pet_noise` is the CoV at SUV 2.5 after the blur (scaled by counts), at any voxel size;
    the blur spreads a point source with the configured FWHM."""
    plan = plan_cohort(TINY)[0]
    uniform = np.full((48, 48, 48), 2.5, np.float32)
    noisy = scanner.pet_suv(uniform, spacing, 6.5, 0.12, plan, np.random.default_rng(0))
    core = noisy[8:-8, 8:-8, 8:-8]
    expected = 0.12 / np.sqrt(scanner.counts_factor(plan))
    assert core.std() / core.mean() == pytest.approx(expected, rel=0.05)
    assert core.mean() == pytest.approx(2.5, rel=0.01)
    point = np.zeros((41, 41, 41), np.float32)
    point[20, 20, 20] = 1.0
    blurred = scanner.pet_suv(point, spacing, 6.5, 0.0, plan, np.random.default_rng(0))
    profile = blurred[20, 20, :] / blurred[20, 20, 20]
    sigma_mm = np.sqrt(np.sum(profile * (np.arange(41) - 20) ** 2) / profile.sum()) * spacing[2]
    assert sigma_mm * 2 * np.sqrt(2 * np.log(2)) == pytest.approx(6.5, rel=0.05)


# ---------------------------------------------------------------- generated studies


def test_layout_and_determinism(
    tmp_path_factory: pytest.TempPathFactory, lesion_row: dict, lesion_study: Path
) -> None:
    folders = sorted(p.name for p in lesion_study.iterdir())
    expected = sorted([lesion_row["ct_series"], lesion_row["pet_series"], lesion_row["seg_series"]])
    assert folders == sorted([*expected, "truth"])
    assert sorted(p.name for p in (lesion_study / "truth").iterdir()) == [
        "CTres.nii.gz",
        "SEG.nii.gz",
        "SUV.nii.gz",
    ]
    pet_files = sorted(p.name for p in (lesion_study / lesion_row["pet_series"]).iterdir())
    assert pet_files == [f"1-{i:03d}.dcm" for i in range(1, TINY["pet_shape"][0] + 1)]
    again = _fetch(tmp_path_factory, lesion_row, "again")
    first = sorted(p.relative_to(lesion_study) for p in lesion_study.rglob("*.dcm"))
    second = sorted(p.relative_to(again) for p in again.rglob("*.dcm"))
    assert first == second
    for relative in first:
        assert (lesion_study / relative).read_bytes() == (again / relative).read_bytes(), relative


@pytest.mark.parametrize(
    "change", [{"pet_noise": 0.2}, {"ct_padding_hu": -2048}, {"seg_layout": "lesion_frames"}]
)
def test_other_settings_give_other_uids(lesion_row: dict, change: dict) -> None:
    other = source.list_studies({**TINY, **change})
    row = next(r for r in other if r["study_id"] == lesion_row["study_id"])
    assert row["pet_series"] != lesion_row["pet_series"]


def _frame_z(seg: pydicom.Dataset) -> list[float]:
    return [
        float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]


def test_seg_frames_are_the_pet_slices_feet_to_head(lesion_row: dict, lesion_study: Path) -> None:
    """The collection's layout (the default): frame k is the k-th PET slice from the feet, and
    refers to it."""
    pet = _by_z(_read_series(lesion_study, lesion_row["pet_series"]))
    (seg,) = _read_series(lesion_study, lesion_row["seg_series"])
    assert _frame_z(seg) == [float(ds.ImagePositionPatient[2]) for ds in pet]
    for frame, ds in zip(seg.PerFrameFunctionalGroupsSequence, pet, strict=True):
        (source_image,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert source_image.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    truth = nifti.load(lesion_study / "truth" / "SEG.nii.gz", "test").array
    np.testing.assert_array_equal(seg.pixel_array, truth)


def test_lesion_frames_layout_holds_only_lesion_frames_head_to_feet(
    tmp_path: Path, lesion_row: dict
) -> None:
    settings = {**TINY, "seg_layout": "lesion_frames"}
    row = next(r for r in source.list_studies(settings) if r["study_id"] == lesion_row["study_id"])
    source.fetch_study(settings, row, tmp_path)
    (seg,) = _read_series(tmp_path, row["seg_series"])
    truth = nifti.load(tmp_path / "truth" / "SEG.nii.gz", "test").array
    lesion_slices = np.flatnonzero(truth.any(axis=(1, 2)))[::-1]
    pet = _by_z(_read_series(tmp_path, row["pet_series"]))
    assert _frame_z(seg) == [float(pet[k].ImagePositionPatient[2]) for k in lesion_slices]
    np.testing.assert_array_equal(seg.pixel_array, truth[lesion_slices])


def test_padding_choices_are_the_values_every_stage_reads_as_air() -> None:
    choices, _ = typing.get_args(typing.get_type_hints(SyntheticSettings)["ct_padding_hu"])
    assert typing.get_args(choices) == CT_PADDING_HU


@pytest.mark.parametrize(("padding_hu", "stored"), [(-3024, -2000), (-2048, -1024)])
def test_ct_padding_outside_the_reconstruction_circle(
    tmp_path: Path, lesion_row: dict, lesion_study: Path, padding_hu: int, stored: int
) -> None:
    """Padding changes the CT outside the circle inscribed in its field of view and nothing else;
    PixelPaddingValue names it as a signed stored value."""
    settings = {**TINY, "ct_padding_hu": padding_hu}
    row = next(r for r in source.list_studies(settings) if r["study_id"] == lesion_row["study_id"])
    source.fetch_study(settings, row, tmp_path)
    padded = _by_z(_read_series(tmp_path, row["ct_series"]))
    plain = _by_z(_read_series(lesion_study, lesion_row["ct_series"]))
    ny, nx = TINY["ct_shape"][1:]
    y, x = np.ogrid[:ny, :nx]
    outside = (y - (ny - 1) / 2) ** 2 + (x - (nx - 1) / 2) ** 2 > (min(ny, nx) / 2) ** 2
    for a, b in zip(padded, plain, strict=True):
        assert a.PixelPaddingValue == stored
        assert a["PixelPaddingValue"].VR == "SS"
        assert (a.pixel_array[outside] == stored).all()
        np.testing.assert_array_equal(a.pixel_array[~outside], b.pixel_array[~outside])
    for name in ("SUV", "SEG", "CTres"):
        truth, plain_truth = (
            nifti.load(folder / "truth" / f"{name}.nii.gz", "test").array
            for folder in (tmp_path, lesion_study)
        )
        np.testing.assert_array_equal(truth, plain_truth)


def test_dicom_tags(lesion_row: dict, lesion_study: Path) -> None:
    ct = _read_series(lesion_study, lesion_row["ct_series"])
    pet = _read_series(lesion_study, lesion_row["pet_series"])
    (seg,) = _read_series(lesion_study, lesion_row["seg_series"])
    assert {ds.SOPClassUID for ds in ct} == {CTImageStorage}
    assert {ds.SOPClassUID for ds in pet} == {PositronEmissionTomographyImageStorage}
    assert seg.SOPClassUID == SegmentationStorage
    for ds in [*ct, *pet, seg]:
        assert ds.StudyInstanceUID == ct[0].StudyInstanceUID
        assert ds.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        assert ds.PatientID == lesion_row["patient_id"]
    assert len({ds.SOPInstanceUID for ds in [*ct, *pet, seg]}) == len(ct) + len(pet) + 1
    assert ct[0].Modality == "CT" and pet[0].Modality == "PT" and seg.Modality == "SEG"
    assert ct[0].pixel_array.dtype == np.int16
    assert float(ct[0].RescaleSlope) == 1.0 and float(ct[0].RescaleIntercept) == -1024.0
    for ds in pet:
        assert ds.Units == "BQML"
        assert ds.DecayCorrection == "START"
        assert {"DECY", "ATTN"} <= set(ds.CorrectedImage)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert 50.0 <= float(ds.PatientWeight) <= 110.0
        assert _seconds(ds.AcquisitionTime) >= _seconds(ds.SeriesTime)
        drug = ds.RadiopharmaceuticalInformationSequence[0]
        assert drug.Radiopharmaceutical == "Fluorodeoxyglucose"
        assert float(drug.RadionuclideHalfLife) == 6586.2
        assert 150e6 <= float(drug.RadionuclideTotalDose) <= 400e6
        uptake = _seconds(ds.SeriesTime) - _seconds(drug.RadiopharmaceuticalStartTime)
        assert 50 * 60 <= uptake <= 80 * 60
    assert len({ds.RescaleSlope for ds in pet}) > 1  # per-slice scaling, as real PET
    assert len({ds.AcquisitionTime for ds in pet}) > 1  # beds acquired one after the other
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == pet[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= {
        ds.SOPInstanceUID for ds in pet
    }


def test_truth_suv_matches_pet_pixels(lesion_row: dict, lesion_study: Path) -> None:
    """SUV = Bq/ml / (dose decayed from injection to SeriesTime / body weight in g)."""
    pet = _by_z(_read_series(lesion_study, lesion_row["pet_series"]))
    factor = _bqml_per_suv(pet[0])
    bqml = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in pet]
    )
    truth = nifti.load(lesion_study / "truth" / "SUV.nii.gz", "test")
    assert truth.array.dtype == np.float32
    assert truth.array.shape == bqml.shape
    np.testing.assert_allclose(truth.array, bqml / factor, rtol=1e-5, atol=1e-6)
    # the truth's affine places voxel (k, j, i) where the DICOM slice k puts it (LPS -> RAS)
    for k in (0, len(pet) - 1):
        lps = np.array([float(v) for v in pet[k].ImagePositionPatient])
        ras = truth.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-3)
    assert truth.spacing_zyx == pytest.approx(
        (float(pet[0].SliceThickness), *(float(v) for v in pet[0].PixelSpacing))
    )


def test_truth_seg_matches_dicom_seg(lesion_row: dict, lesion_study: Path) -> None:
    pet = _by_z(_read_series(lesion_study, lesion_row["pet_series"]))
    seg = hd.seg.segread(next((lesion_study / lesion_row["seg_series"]).glob("*.dcm")))
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in pet],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )[..., 0]
    truth = nifti.load(lesion_study / "truth" / "SEG.nii.gz", "test")
    assert truth.array.dtype == np.uint8
    np.testing.assert_array_equal(truth.array, frames)
    assert truth.array.sum() > 0
    assert set(np.unique(truth.array)) == {0, 1}


def test_lesion_free_study(empty_row: dict, empty_study: Path) -> None:
    truth = nifti.load(empty_study / "truth" / "SEG.nii.gz", "test")
    assert not truth.array.any()
    (seg,) = _read_series(empty_study, empty_row["seg_series"])
    assert int(seg.NumberOfFrames) == TINY["pet_shape"][0]
    assert not seg.pixel_array.any()
    # organs alone exceed a plain SUV threshold of 4: brain, bladder, kidneys, heart
    suv = nifti.load(empty_study / "truth" / "SUV.nii.gz", "test").array
    assert suv.max() > 6.0


def test_ct_and_pet_grids_differ_but_agree_in_space(lesion_row: dict, lesion_study: Path) -> None:
    ct = _by_z(_read_series(lesion_study, lesion_row["ct_series"]))
    pet = _by_z(_read_series(lesion_study, lesion_row["pet_series"]))
    assert len(ct) != len(pet)
    assert float(ct[0].SliceThickness) < float(pet[0].SliceThickness)
    assert float(ct[0].PixelSpacing[0]) < float(pet[0].PixelSpacing[0])
    assert list(ct[0].ImagePositionPatient) != list(pet[0].ImagePositionPatient)
    # the CT at the voxel nearest each PET voxel centre agrees with the truth CTres, and agrees
    # better at the written geometry than with the CT moved by one voxel along any axis
    hu = np.stack([ds.pixel_array * 1.0 + float(ds.RescaleIntercept) for ds in ct])
    ct_origin = np.array([float(v) for v in ct[0].ImagePositionPatient])
    ct_step = np.array([*(float(v) for v in ct[0].PixelSpacing[::-1]), float(ct[0].SliceThickness)])
    truth = nifti.load(lesion_study / "truth" / "CTres.nii.gz", "test")
    k, j, i = np.indices(truth.array.shape).reshape(3, -1)
    ras = (truth.affine @ np.stack([i, j, k, np.ones_like(i)]))[:3]
    lps = ras * np.array([-1, -1, 1])[:, None]

    def mean_abs_difference(shift_mm: np.ndarray) -> float:
        idx = np.rint((lps - (ct_origin + shift_mm)[:, None]) / ct_step[:, None]).astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(hu.shape[::-1])[:, None]), axis=0)
        sampled = hu[idx[2, inside], idx[1, inside], idx[0, inside]]
        return float(np.mean(np.abs(sampled - truth.array.reshape(-1)[inside])))

    written = mean_abs_difference(np.zeros(3))
    shifted = [mean_abs_difference(sign * step) for step in np.diag(ct_step) for sign in (-1, 1)]
    assert written < min(shifted)
    assert written < 30.0  # CT noise (12 HU) and nearest-neighbour error at tissue borders
    assert set(np.unique(truth.array)) <= set(phantom.HU.tolist())


@pytest.mark.requires("dciodvfy")
def test_dciodvfy_finds_no_errors(
    lesion_row: dict, lesion_study: Path, empty_row: dict, empty_study: Path
) -> None:
    """David Clunie's IOD verifier: every CT, PET and SEG object is complete and consistent."""
    files = [
        next((lesion_study / lesion_row["ct_series"]).glob("*.dcm")),
        next((lesion_study / lesion_row["pet_series"]).glob("*.dcm")),
        next((lesion_study / lesion_row["seg_series"]).glob("*.dcm")),
        next((empty_study / empty_row["seg_series"]).glob("*.dcm")),
    ]
    for path in files:
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], (path, errors)


@pytest.mark.requires("dcm2niix")
def test_dcm2niix_reads_the_pet_as_the_truth(
    tmp_path: Path, lesion_row: dict, lesion_study: Path
) -> None:
    """An independent converter gets the same Bq/ml volume, in the same place, as the truth."""
    subprocess.run(
        [
            "dcm2niix",
            "-z",
            "n",
            "-o",
            str(tmp_path),
            "-f",
            "pet",
            str(lesion_study / lesion_row["pet_series"]),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    converted = nib.as_closest_canonical(nib.load(tmp_path / "pet.nii"))
    truth = nib.as_closest_canonical(nib.load(lesion_study / "truth" / "SUV.nii.gz"))
    np.testing.assert_allclose(converted.affine, truth.affine, atol=0.01)
    factor = _bqml_per_suv(
        pydicom.dcmread(next((lesion_study / lesion_row["pet_series"]).glob("*.dcm")))
    )
    np.testing.assert_allclose(
        converted.get_fdata() / factor, truth.get_fdata(), rtol=1e-4, atol=1e-4
    )


def test_bad_rows_name_the_study(tmp_path: Path, lesion_row: dict) -> None:
    with pytest.raises(StudyError, match=r"SYN9999_1.*not in the synthetic cohort"):
        source.fetch_study(TINY, {"study_id": "SYN9999_1"}, tmp_path)
    stale = {**lesion_row, "pet_series": "4.000000-PET_corr.-00000"}
    with pytest.raises(StudyError, match=r"other download\.synthetic settings"):
        source.fetch_study(TINY, stale, tmp_path)


def test_defaults_fill_missing_optional_keys() -> None:
    settings = settings_with_defaults(TINY)
    assert settings["lesion_volume_ml"] == [0.5, 60.0]
    assert settings["lesions_per_study"] == [1, 6]
