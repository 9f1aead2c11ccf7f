"""stepseg.dicom on a tiny synthetic study whose files are modified with pydicom: grouping by tags,
slice order and affines (checked against SimpleITK), SUV factor from tags, SEG decoding."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 (the library's own convention)
from pydicom.fileset import FileSet

from stepseg import dicom
from stepseg.errors import StudyError
from stepseg.synthetic import source

STUDY = "SYNTEST"
F18_HALF_LIFE_S = 6586.2


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_synthetic_settings) -> Path:
    settings = tiny_synthetic_settings
    row = next(r for r in source.list_studies(settings) if r["has_lesions"])
    out = tmp_path_factory.mktemp("raw") / row["study_id"]
    out.mkdir()
    source.fetch_study(settings, row, out)
    return out


@pytest.fixture
def study_copy(study_dir, tmp_path) -> Path:
    return Path(shutil.copytree(study_dir, tmp_path / "raw"))


def series_dir(raw: Path, modality: str) -> Path:
    for folder in sorted(p for p in raw.iterdir() if p.is_dir() and p.name != "truth"):
        first = next(folder.iterdir())
        if pydicom.dcmread(first, stop_before_pixels=True).Modality == modality:
            return folder
    raise AssertionError(f"no {modality} folder in {raw}")


def edit(paths, change) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


def series(raw: Path, modality: str) -> dicom.Series:
    return dicom.select_series(STUDY, dicom.find_series(STUDY, raw), modality, raw)


def sitk_ras_affine(folder: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """SimpleITK's reading of a series folder as a RAS affine and a (z, y, x) shape."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, tuple(image.GetSize()[::-1])


def test_series_are_grouped_by_tags_in_any_layout(study_copy, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    counts = {}
    for i, path in enumerate(sorted(study_copy.rglob("*.dcm"))):
        modality = pydicom.dcmread(path, stop_before_pixels=True).Modality
        counts[modality] = counts.get(modality, 0) + 1
        shutil.copy(path, flat / f"{(i * 7919) % 1000:04d}_{i}")  # names say nothing
    shutil.copytree(study_copy / "truth", flat / "truth")
    (flat / "README.txt").write_text("not DICOM")
    fileset = FileSet()
    fileset.add(sorted(study_copy.rglob("*.dcm"))[0])
    fileset.write(tmp_path / "fileset")  # writes DICOMDIR beside a copy of the instance
    shutil.copy(tmp_path / "fileset/DICOMDIR", flat / "DICOMDIR")

    found = dicom.find_series(STUDY, flat)

    assert {s.modality: len(s.headers) for s in found} == counts
    assert counts == {"CT": 60, "PT": 48, "SEG": 1}


def test_slices_sorted_by_position_not_file_name_or_instance_number(study_copy):
    pet_dir = series_dir(study_copy, "PT")
    reference = dicom.stack_slices(STUDY, series(study_copy, "PT"))
    files = sorted(pet_dir.iterdir())
    # reverse the file names and scramble InstanceNumber
    for path in files:
        path.rename(path.with_name("tmp-" + path.name))
    for i, path in enumerate(sorted(pet_dir.iterdir())):
        path.rename(pet_dir / files[len(files) - 1 - i].name)
    edit(sorted(pet_dir.iterdir()), lambda ds: setattr(ds, "InstanceNumber", 1))

    stack = dicom.stack_slices(STUDY, series(study_copy, "PT"))

    assert [h.SOPInstanceUID for h in stack.headers] == [
        h.SOPInstanceUID for h in reference.headers
    ]
    z = [float(h.ImagePositionPatient[2]) for h in stack.headers]
    assert z == sorted(z)  # axial, normal +z (superior): z index runs feet to head
    np.testing.assert_allclose(stack.affine, reference.affine)


@pytest.mark.parametrize("modality", ["CT", "PT"])
def test_affine_and_shape_agree_with_simpleitk(study_dir, modality):
    stack = dicom.stack_slices(STUDY, series(study_dir, modality))
    affine, shape = sitk_ras_affine(series_dir(study_dir, modality))
    assert stack.shape == shape
    np.testing.assert_allclose(stack.affine, affine, atol=1e-3)


def test_oblique_orientation_agrees_with_simpleitk(study_copy):
    """A rigidly rotated CT (IOP and IPP rotated together): the affine follows IOP."""
    angle = np.deg2rad(20.0)
    rotation = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )

    def rotate(ds):
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ds.ImageOrientationPatient = [
            f"{v:.8f}" for v in np.concatenate([rotation @ iop[:3], rotation @ iop[3:]])
        ]
        ds.ImagePositionPatient = [
            f"{v:.6f}" for v in rotation @ np.asarray(ds.ImagePositionPatient, float)
        ]

    ct_dir = series_dir(study_copy, "CT")
    before = dicom.stack_slices(STUDY, series(study_copy, "CT")).affine
    edit(sorted(ct_dir.iterdir()), rotate)

    stack = dicom.stack_slices(STUDY, series(study_copy, "CT"))
    affine, shape = sitk_ras_affine(ct_dir)

    assert stack.shape == shape
    np.testing.assert_allclose(stack.affine, affine, atol=1e-3)
    ras_rotation = np.diag([-1.0, -1.0, 1.0]) @ rotation @ np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(stack.affine[:3, :3], ras_rotation @ before[:3, :3], atol=1e-5)
    assert nib.aff2axcodes(stack.affine) == nib.aff2axcodes(before)


def test_missing_slice_is_refused(study_copy):
    pet_dir = series_dir(study_copy, "PT")
    sorted(pet_dir.iterdir())[20].unlink()
    with pytest.raises(StudyError, match=r"slice gaps range .*missing slices") as error:
        dicom.stack_slices(STUDY, series(study_copy, "PT"))
    assert STUDY in str(error.value)


def test_duplicate_slice_position_is_refused(study_copy):
    files = sorted(series_dir(study_copy, "PT").iterdir())
    position = pydicom.dcmread(files[3]).ImagePositionPatient
    edit([files[4]], lambda ds: setattr(ds, "ImagePositionPatient", position))
    with pytest.raises(StudyError, match="share one position") as error:
        dicom.stack_slices(STUDY, series(study_copy, "PT"))
    assert str(files[4]) in str(error.value) or str(files[3]) in str(error.value)


def expected_factor(header, reference: str) -> float:
    """Body-weight SUV factor computed by hand from the tags of `header`."""
    info = header.RadiopharmaceuticalInformationSequence[0]

    def seconds(hhmmss: str) -> float:
        return int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + float(hhmmss[4:])

    elapsed = seconds(reference) - seconds(info.RadiopharmaceuticalStartTime)
    decayed = float(info.RadionuclideTotalDose) * 2 ** (-elapsed / F18_HALF_LIFE_S)
    return float(header.PatientWeight) * 1000 / decayed


def test_suv_factor_from_tags_for_both_reference_times(study_dir):
    stack = dicom.stack_slices(STUDY, series(study_dir, "PT"))
    first = stack.headers[0]
    earliest_acquisition = min(str(h.AcquisitionTime) for h in stack.headers)
    assert earliest_acquisition != first.SeriesTime  # the generator delays the first bed

    by_series = dicom.suv_factor(STUDY, stack, "series")
    by_acquisition = dicom.suv_factor(STUDY, stack, "acquisition")

    assert by_series == pytest.approx(expected_factor(first, first.SeriesTime), rel=1e-9)
    assert by_acquisition == pytest.approx(expected_factor(first, earliest_acquisition), rel=1e-9)


def test_suv_factor_across_midnight_without_start_datetime(study_copy):
    def shift(ds):
        ds.SeriesTime = "000500"
        info = ds.RadiopharmaceuticalInformationSequence[0]
        del info.RadiopharmaceuticalStartDateTime
        info.RadiopharmaceuticalStartTime = "231500"

    edit(sorted(series_dir(study_copy, "PT").iterdir()), shift)
    stack = dicom.stack_slices(STUDY, series(study_copy, "PT"))
    first = stack.headers[0]
    decayed = float(first.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose) * 2 ** (
        -50 * 60 / F18_HALF_LIFE_S
    )
    assert dicom.suv_factor(STUDY, stack, "series") == pytest.approx(
        float(first.PatientWeight) * 1000 / decayed, rel=1e-9
    )


WEIGHT_KG, DOSE_BQ = 72.5, 3.1e8


def pet_headers_with(study_dir: Path, tags: dict, start: dict) -> dicom.Stack:
    """The study's PET headers (read afresh, no pixels) with `tags` set on every slice and the
    radiopharmaceutical item's `start` tags replaced (None deletes a tag)."""
    headers = []
    for path in sorted(series_dir(study_dir, "PT").iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.PatientWeight = str(WEIGHT_KG)
        info = ds.RadiopharmaceuticalInformationSequence[0]
        info.RadionuclideTotalDose = str(DOSE_BQ)
        for keyword in ("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime"):
            if keyword in info:
                delattr(info, keyword)
        for keyword, value in start.items():
            if value is not None:
                setattr(info, keyword, value)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        headers.append(ds)
    return dicom.Stack(tuple(headers), np.eye(4))


F18, GA68, C11 = 6586.2, 4062.6, 1221.66
SERIES_0930 = {"SeriesDate": "20220314", "SeriesTime": "093000"}


# (half-life s, PET tags, radiopharmaceutical start tags, seconds from injection to SeriesTime,
# worked out by hand from the tags)
SUV_CASES = {
    "F-18, start date-time": (
        F18,
        SERIES_0930,
        {"RadiopharmaceuticalStartDateTime": "20220314083000"},
        3600,
    ),
    "Ga-68": (GA68, SERIES_0930, {"RadiopharmaceuticalStartDateTime": "20220314083000"}, 3600),
    "C-11, 45 min": (C11, SERIES_0930, {"RadiopharmaceuticalStartTime": "084500"}, 2700),
    "injected the previous evening (start date-time)": (
        F18,
        {"SeriesDate": "20220314", "SeriesTime": "091500"},
        {
            "RadiopharmaceuticalStartDateTime": "20220313213000",
            "RadiopharmaceuticalStartTime": "213000",
        },
        2.5 * 3600 + 9.25 * 3600,
    ),
    "start date-time in UTC, series at +0100": (
        F18,
        {**SERIES_0930, "TimezoneOffsetFromUTC": "+0100"},
        {"RadiopharmaceuticalStartDateTime": "20220314073000+0000"},
        3600,  # 07:30 UTC is 08:30 local
    ),
    "start date-time in UTC, series at -0500": (
        GA68,
        {**SERIES_0930, "TimezoneOffsetFromUTC": "-0500"},
        {"RadiopharmaceuticalStartDateTime": "20220314134500+0000"},
        2700,  # 13:45 UTC is 08:45 local
    ),
    "UTC injection the previous day at -0800": (
        F18,
        {"SeriesDate": "20220314", "SeriesTime": "003000", "TimezoneOffsetFromUTC": "-0800"},
        {"RadiopharmaceuticalStartDateTime": "20220314070000+0000"},
        1.5 * 3600,  # 07:00 UTC on the 14th is 23:00 local on the 13th
    ),
    "start date-time with the series' own offset": (
        F18,
        {**SERIES_0930, "TimezoneOffsetFromUTC": "+0200"},
        {"RadiopharmaceuticalStartDateTime": "20220314083000+0200"},
        3600,
    ),
}


@pytest.mark.parametrize(
    ("half_life", "tags", "start", "elapsed_s"), SUV_CASES.values(), ids=SUV_CASES.keys()
)
def test_suv_factor_by_hand(study_dir, half_life, tags, start, elapsed_s):
    stack = pet_headers_with(study_dir, tags, {**start, "RadionuclideHalfLife": str(half_life)})
    decayed = DOSE_BQ * 2 ** (-elapsed_s / half_life)
    expected = WEIGHT_KG * 1000 / decayed
    assert dicom.suv_factor(STUDY, stack, "series") == pytest.approx(expected, rel=1e-9)


SUV_ERRORS = {
    "injected after the series (start date-time)": (
        F18,
        {"RadiopharmaceuticalStartDateTime": "20220314094500"},
        r"injection at 2022-03-14 09:45:00 is 900 s after SeriesTime 2022-03-14 09:30:00",
    ),
    "injected after the series (time of day only: 23 h 50 min before)": (
        F18,
        {"RadiopharmaceuticalStartTime": "094000"},
        r"85800 s from injection at 2022-03-13 09:40:00 to SeriesTime .* more than 10 half-lives",
    ),
    "more than ten C-11 half-lives": (
        C11,
        {"RadiopharmaceuticalStartDateTime": "20220314060000"},
        r"12600 s from injection .* more than 10 half-lives \(1221.66 s\)",
    ),
    "no dose": (
        F18,
        {"RadionuclideTotalDose": "0", "RadiopharmaceuticalStartTime": "083000"},
        r"implausible SUV tags: dose 0.0 Bq",
    ),
    "no half-life": (
        "0",
        {"RadiopharmaceuticalStartTime": "083000"},
        r"implausible SUV tags: .*half-life 0.0 s",
    ),
    "malformed start date-time": (
        F18,
        {"RadiopharmaceuticalStartDateTime": "garbage"},
        r"malformed Radiopharm",
    ),
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR DT")  # pydicom on "garbage"
@pytest.mark.parametrize(
    ("half_life", "start", "message"), SUV_ERRORS.values(), ids=SUV_ERRORS.keys()
)
def test_suv_factor_refuses_implausible_timing(study_dir, half_life, start, message):
    stack = pet_headers_with(
        study_dir, SERIES_0930, {**start, "RadionuclideHalfLife": str(half_life)}
    )
    with pytest.raises(StudyError, match=message) as error:
        dicom.suv_factor(STUDY, stack, "series")
    assert str(stack.headers[0].filename) in str(error.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: setattr(ds, "Units", "CNTS"), "Units is 'CNTS'; only BQML"),
        (lambda ds: setattr(ds, "DecayCorrection", "ADMIN"), "DecayCorrection is 'ADMIN'"),
        (lambda ds: delattr(ds, "RadiopharmaceuticalInformationSequence"), "lacks Radionuclide"),
        (lambda ds: delattr(ds, "PatientWeight"), "no PatientWeight"),
    ],
)
def test_suv_factor_refuses_what_it_cannot_convert(study_copy, change, message):
    edit(sorted(series_dir(study_copy, "PT").iterdir()), change)
    stack = dicom.stack_slices(STUDY, series(study_copy, "PT"))
    with pytest.raises(StudyError, match=message) as error:
        dicom.suv_factor(STUDY, stack, "series")
    assert str(stack.headers[0].filename) in str(error.value)


def test_seg_decodes_to_the_truth_mask(study_dir):
    pet = dicom.stack_slices(STUDY, series(study_dir, "PT"))
    mask = dicom.decode_seg(STUDY, series(study_dir, "SEG"), pet)
    truth = np.asarray(nib.load(study_dir / "truth/SEG.nii.gz").dataobj).transpose(2, 1, 0)
    assert mask.dtype == np.uint8
    assert mask.sum() > 0
    np.testing.assert_array_equal(mask, truth)


def test_seg_with_shifted_frames_is_refused(study_copy):
    def shift(ds):
        for frame in ds.PerFrameFunctionalGroupsSequence:
            position = frame.PlanePositionSequence[0].ImagePositionPatient
            position[2] = f"{float(position[2]) + 5.0:.6f}"

    seg_file = next(series_dir(study_copy, "SEG").iterdir())
    edit([seg_file], shift)
    pet = dicom.stack_slices(STUDY, series(study_copy, "PT"))
    with pytest.raises(StudyError, match="SEG frame 1 lies at") as error:
        dicom.decode_seg(STUDY, series(study_copy, "SEG"), pet)
    assert str(seg_file) in str(error.value)
