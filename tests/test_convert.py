"""convert_study on a tiny generated study: values against the generator's truth, geometry against
SimpleITK and dcm2niix, and bad inputs (built by modifying the study's files with pydicom) that
must raise a StudyError naming the study and the file and leave no output behind."""

import dataclasses
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 (the library's own convention)
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from reference import autopet_conversion as official
from reference.geometry import assert_ctres_geometry

from stepseg import nifti
from stepseg.convert import convert_study
from stepseg.errors import StudyError
from stepseg.names import NIFTI_NAMES
from stepseg.settings import ConvertSettings
from stepseg.synthetic import source

F18_HALF_LIFE_S = 6586.2
# the generator's truth SUV is decayed to SeriesTime (the exact reference of DecayCorrection START)
TRUTH_SETTINGS = ConvertSettings(suv_reference_time="series", ctres_interpolation="linear")


def generate(tmp_path_factory, settings: dict) -> tuple[str, Path]:
    """The first lesion study of the cohort of `settings`: its id and raw folder."""
    row = next(r for r in source.list_studies(settings) if r["has_lesions"])
    raw = tmp_path_factory.mktemp("raw") / row["study_id"]
    raw.mkdir()
    source.fetch_study(settings, row, raw)
    return row["study_id"], raw


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_synthetic_settings) -> tuple[str, Path]:
    return generate(tmp_path_factory, tiny_synthetic_settings)


def outputs_in(folder: Path) -> dict[str, str]:
    return {name: str(folder / f"{name}.nii.gz") for name in NIFTI_NAMES}


@pytest.fixture(scope="module")
def converted(study, tmp_path_factory) -> dict[str, str]:
    study_id, raw = study
    outputs = outputs_in(tmp_path_factory.mktemp("nifti"))
    convert_study(study_id, raw, outputs, TRUTH_SETTINGS)
    return outputs


def load(path) -> nifti.Volume:
    return nifti.load(path, "test")


def series_dir(raw: Path, modality: str) -> Path:
    for folder in sorted(p for p in raw.iterdir() if p.is_dir() and p.name != "truth"):
        if pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).Modality == modality:
            return folder
    raise AssertionError(f"no {modality} folder in {raw}")


def test_suv_matches_truth(study, converted):
    _, raw = study
    suv, truth = load(converted["SUV"]), load(raw / "truth/SUV.nii.gz")
    body = truth.array > 0.5
    relative_error = np.abs(suv.array[body] - truth.array[body]) / truth.array[body]
    assert np.median(relative_error) < 0.01
    assert relative_error.max() < 1e-4  # same tags, same formula: only float32 rounding left


def test_seg_equals_truth(study, converted):
    _, raw = study
    seg = nib.load(converted["SEG"])
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(
        np.asarray(seg.dataobj), np.asarray(nib.load(raw / "truth/SEG.nii.gz").dataobj)
    )
    assert set(np.unique(np.asarray(seg.dataobj))) == {0, 1}


def test_ctres_matches_truth_inside_the_body(study, converted):
    """Inside the body (the volume is ~95 % air), and better than the CTres moved by one voxel
    or flipped along any axis: a transposed, flipped or shifted CTres fails."""
    _, raw = study
    ctres, truth = load(converted["CTres"]), load(raw / "truth/CTres.nii.gz")
    assert_ctres_geometry(ctres.array, truth.array)


def test_suv_ctres_seg_share_the_pet_grid(study, converted):
    _, raw = study
    images = {name: nib.load(converted[name]) for name in ("PET", "SUV", "CTres", "SEG")}
    truth = nib.load(raw / "truth/SUV.nii.gz")
    for name, image in images.items():
        assert image.shape == truth.shape, name
        np.testing.assert_allclose(image.affine, truth.affine, atol=1e-4, err_msg=name)
    assert len({image.affine.tobytes() for image in images.values()}) == 1  # exactly one affine
    pet, suv = load(converted["PET"]), load(converted["SUV"])
    ratio = suv.array[pet.array > 1000] / pet.array[pet.array > 1000]
    assert np.ptp(ratio) < 1e-6 * ratio.mean()  # SUV is the PET times one factor


def test_acquisition_reference_scales_suv_by_the_decay_between_the_times(study, tmp_path):
    study_id, raw = study
    by_series, by_acquisition = outputs_in(tmp_path / "s"), outputs_in(tmp_path / "a")
    convert_study(study_id, raw, by_series, TRUTH_SETTINGS)
    convert_study(
        study_id,
        raw,
        by_acquisition,
        dataclasses.replace(TRUTH_SETTINGS, suv_reference_time="acquisition"),
    )

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in series_dir(raw, "PT").iterdir()]

    def seconds(hhmmss) -> int:
        return int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6])

    delay = min(seconds(h.AcquisitionTime) for h in headers) - seconds(headers[0].SeriesTime)
    assert delay > 0
    ratio = load(by_acquisition["SUV"]).array.sum() / load(by_series["SUV"]).array.sum()
    assert ratio == pytest.approx(2 ** (delay / F18_HALF_LIFE_S), rel=1e-5)


def test_nearest_ctres_only_holds_ct_values(study, converted, tmp_path):
    study_id, raw = study
    outputs = outputs_in(tmp_path)
    convert_study(
        study_id, raw, outputs, dataclasses.replace(TRUTH_SETTINGS, ctres_interpolation="nearest")
    )
    ct_values = np.unique(load(converted["CT"]).array)
    ctres = load(outputs["CTres"]).array
    assert np.isin(ctres, np.append(ct_values, -1024)).all()
    assert not np.isin(load(converted["CTres"]).array, ct_values).all()  # linear interpolates


def sitk_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's (z, y, x) array and RAS affine of a series folder."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize(("name", "modality"), [("CT", "CT"), ("PET", "PT")])
def test_ct_and_pet_agree_with_simpleitk(study, converted, name, modality):
    _, raw = study
    array, affine = sitk_series(series_dir(raw, modality))
    ours = load(converted[name])
    assert ours.array.shape == array.shape
    np.testing.assert_allclose(ours.affine, affine, atol=1e-3)
    np.testing.assert_allclose(ours.array, array, rtol=1e-5, atol=1e-3)


def dcm2niix_input(raw: Path, modality: str, folder: Path) -> Path:
    """The series folder as dcm2niix can read it: dcm2niix (v1.0.20220720) orders PET slices by
    FrameReferenceTime, which the generator varies per bed position like a scanner does, and then
    fails; the tag carries no geometry, so it is removed from a copy."""
    copy = Path(shutil.copytree(series_dir(raw, modality), folder))
    edit(sorted(copy.iterdir()), lambda ds: ds.pop("FrameReferenceTime", None))
    return copy


@pytest.mark.requires("dcm2niix")
@pytest.mark.parametrize(("name", "modality"), [("CT", "CT"), ("PET", "PT")])
def test_geometry_agrees_with_dcm2niix(study, converted, tmp_path, name, modality):
    """dcm2niix may store another voxel order (it flips rows); compare in canonical RAS order."""
    _, raw = study
    series = dcm2niix_input(raw, modality, tmp_path / "dicom")
    subprocess.run(
        ["dcm2niix", "-z", "y", "-f", "out", "-o", str(tmp_path), str(series)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    theirs = nib.as_closest_canonical(nib.load(tmp_path / "out.nii.gz"))
    ours = nib.as_closest_canonical(nib.load(converted[name]))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), rtol=1e-4, atol=1e-3)


def test_lesion_free_study_gives_an_empty_seg(tmp_path, tiny_synthetic_settings):
    settings = tiny_synthetic_settings
    row = next(r for r in source.list_studies(settings) if not r["has_lesions"])
    raw = tmp_path / row["study_id"]
    raw.mkdir()
    source.fetch_study(settings, row, raw)
    outputs = outputs_in(tmp_path / "nifti")
    convert_study(row["study_id"], raw, outputs, TRUTH_SETTINGS)
    seg = load(outputs["SEG"])
    assert seg.array.shape == load(outputs["SUV"]).array.shape
    assert seg.array.dtype == np.uint8
    assert not seg.array.any()


def test_any_folder_layout_gives_the_same_files(study, converted, tmp_path):
    study_id, raw = study
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(raw.rglob("*.dcm"))[::-1]):
        shutil.copy(path, flat / f"IM{i:05d}")
    shutil.copytree(raw / "truth", flat / "truth")
    outputs = outputs_in(tmp_path / "nifti")
    convert_study(study_id, flat, outputs, TRUTH_SETTINGS)
    for name in NIFTI_NAMES:
        a, b = nib.load(outputs[name]), nib.load(converted[name])
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


# ---- CT padding outside the reconstruction circle ---------------------------------------


@pytest.fixture(scope="module")
def padded_study(tmp_path_factory, tiny_synthetic_settings) -> tuple[str, Path]:
    """The study of `study` with -3024 HU (stored -2000, PixelPaddingValue) outside the circle."""
    return generate(tmp_path_factory, {**tiny_synthetic_settings, "ct_padding_hu": -3024})


@pytest.fixture(scope="module")
def padding_as_air(study, converted, padded_study) -> np.ndarray:
    """The CT that conversion must give for the padded study: the unpadded study's CT with air
    where the padded files hold their PixelPaddingValue."""
    ct_files = [pydicom.dcmread(p) for p in series_dir(padded_study[1], "CT").iterdir()]
    assert {ds.PixelPaddingValue for ds in ct_files} == {-2000}
    ring = np.stack(
        [ds.pixel_array == -2000 for ds in sorted(ct_files, key=lambda ds: ds.SliceLocation)]
    )
    assert 0 < ring.sum() < ring.size / 2
    return np.where(ring, -1024, load(converted["CT"]).array)


def test_padded_ct_converts_to_air_before_ctres(study, converted, padded_study, padding_as_air):
    study_id, raw = padded_study
    assert study_id == study[0]
    outputs = outputs_in(raw.parent / "nifti")
    convert_study(study_id, raw, outputs, TRUTH_SETTINGS)
    np.testing.assert_array_equal(load(outputs["CT"]).array, padding_as_air)
    ctres, unpadded = load(outputs["CTres"]).array, load(converted["CTres"]).array
    assert ctres.min() == -1024.0
    assert (ctres != unpadded).sum() > 100  # the circle cuts through the PET field of view
    for name in ("SUV", "SEG"):
        np.testing.assert_array_equal(load(outputs[name]).array, load(converted[name]).array)


def pad_with(value, limit, ring_values):
    """An edit of every CT slice: PixelPaddingValue `value` (an int, or (VR, int) for a VR of
    one's choosing), PixelPaddingRangeLimit `limit` (None: absent) and its padding pixels
    (stored -2000) replaced by `ring_values(rng, n)`."""

    def change(ds):
        pixels = ds.pixel_array.copy()
        ring = pixels == -2000
        pixels[ring] = ring_values(np.random.default_rng(int(ds.InstanceNumber)), ring.sum())
        ds.PixelData = pixels.tobytes()
        del ds.PixelPaddingValue
        if value is not None:
            vr, number = value if isinstance(value, tuple) else ("SS", value)
            ds.add_new("PixelPaddingValue", vr, number)
        if limit is not None:
            ds.add_new("PixelPaddingRangeLimit", "SS", limit)

    return change


@pytest.mark.parametrize(
    "change",
    [
        # stored -2000..-1500 (-3024..-2524 HU), the range given either way round
        pad_with(-2000, -1500, lambda rng, n: rng.integers(-2000, -1499, n)),
        pad_with(-1500, -2000, lambda rng, n: rng.integers(-2000, -1499, n)),
        # a padding value of another scanner: stored -1000, -2024 HU
        pad_with(-1000, None, lambda rng, n: -1000),
        # written unsigned (US 64536) for signed pixels: the same 16 bits as -1000 (-2024 HU)
        pad_with(("US", 64536), None, lambda rng, n: -1000),
        # untagged: -3024 HU is padding anyway
        pad_with(None, None, lambda rng, n: -2000),
    ],
    ids=["range", "range_reversed", "other_value", "unsigned", "untagged"],
)
def test_padding_tags_are_compared_on_stored_values(padded_study, padding_as_air, tmp_path, change):
    study_id, raw = padded_study
    copy = Path(shutil.copytree(raw, tmp_path / "raw"))
    edit(sorted(series_dir(copy, "CT").iterdir()), change)
    outputs = outputs_in(tmp_path / "nifti")
    convert_study(study_id, copy, outputs, TRUTH_SETTINGS)
    np.testing.assert_array_equal(load(outputs["CT"]).array, padding_as_air)
    assert load(outputs["CTres"]).array.min() == -1024.0


# ---- SEG layouts --------------------------------------------------------------------------


def seg_file(raw: Path) -> Path:
    return next(series_dir(raw, "SEG").iterdir())


def in_official_orientation(path: str) -> np.ndarray:
    """A NIfTI's data (x, y, z) reoriented to the official conversion's orientation (LAS)."""
    image = nib.load(path)
    change = ornt_transform(io_orientation(image.affine), axcodes2ornt(official.ORIENTATION))
    return apply_orientation(np.asarray(image.dataobj), change)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_seg_layouts_convert_alike_and_only_the_collections_suits_the_official_script(
    study, converted, tmp_path_factory, tiny_synthetic_settings
):
    """The default layout (every PET slice, feet to head) is what the official script assumes;
    with lesion frames only it puts the lesions at the feet. stepseg reads both alike."""
    study_id, raw = study
    lesion_id, lesion_raw = generate(
        tmp_path_factory, {**tiny_synthetic_settings, "seg_layout": "lesion_frames"}
    )
    assert lesion_id == study_id
    outputs = outputs_in(lesion_raw.parent / "nifti")
    convert_study(study_id, lesion_raw, outputs, TRUTH_SETTINGS)
    ours, theirs = nib.load(converted["SEG"]), nib.load(outputs["SEG"])
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))

    n_slices = load(converted["SUV"]).array.shape[0]
    assert int(pydicom.dcmread(seg_file(raw)).NumberOfFrames) == n_slices
    assert int(pydicom.dcmread(seg_file(lesion_raw)).NumberOfFrames) < n_slices
    mask = in_official_orientation(converted["SEG"]).astype(bool)
    assert mask.sum() > 0
    official_mask = official.dcm2nii_mask(seg_file(raw)).astype(bool)
    np.testing.assert_array_equal(official_mask, mask)
    assert dice(official_mask, mask) == 1.0
    lesion_frames = official.dcm2nii_mask(seg_file(lesion_raw)).astype(bool)
    placed = np.zeros_like(mask)
    placed[..., : lesion_frames.shape[2]] = lesion_frames
    assert dice(placed, mask) < 0.1


def edit(paths, change) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:600])
    return path


def corrupt_pet_file(raw: Path) -> Path:
    return truncate(sorted(series_dir(raw, "PT").iterdir())[10])


def corrupt_pixel_data(raw: Path) -> Path:
    path = sorted(series_dir(raw, "CT").iterdir())[5]
    path.write_bytes(path.read_bytes()[:-1000])
    return path


def pet_without_radiopharmaceutical(raw: Path) -> Path:
    files = sorted(series_dir(raw, "PT").iterdir())
    edit(files, lambda ds: delattr(ds, "RadiopharmaceuticalInformationSequence"))
    return files[-1]  # the most inferior slice comes first in position order


def pet_in_counts(raw: Path) -> Path:
    files = sorted(series_dir(raw, "PT").iterdir())
    edit(files, lambda ds: setattr(ds, "Units", "CNTS"))
    return files[-1]


def one_pet_slice(raw: Path, change) -> Path:
    """Apply `change` to one PET slice in the middle of the series (not the first in position)."""
    path = sorted(series_dir(raw, "PT").iterdir())[7]
    edit([path], change)
    return path


def one_ct_slice(raw: Path, change) -> Path:
    path = sorted(series_dir(raw, "CT").iterdir())[7]
    edit([path], change)
    return path


def one_pet_slice_in_counts(raw: Path) -> Path:
    return one_pet_slice(raw, lambda ds: setattr(ds, "Units", "CNTS"))


def one_pet_slice_without_radiopharmaceutical(raw: Path) -> Path:
    return one_pet_slice(raw, lambda ds: delattr(ds, "RadiopharmaceuticalInformationSequence"))


def one_pet_slice_with_another_dose(raw: Path) -> Path:
    def change(ds):
        info = ds.RadiopharmaceuticalInformationSequence[0]
        info.RadionuclideTotalDose = float(info.RadionuclideTotalDose) * 1.5

    return one_pet_slice(raw, change)


def one_pet_slice_decay_corrected_to_admin(raw: Path) -> Path:
    return one_pet_slice(raw, lambda ds: setattr(ds, "DecayCorrection", "ADMIN"))


def one_pet_slice_with_an_intercept(raw: Path) -> Path:
    return one_pet_slice(raw, lambda ds: setattr(ds, "RescaleIntercept", "-5"))


def one_pet_slice_with_negative_pixels(raw: Path) -> Path:
    def change(ds):
        pixels = ds.pixel_array.copy()
        pixels[0, :3] = -7  # signed pixel data (PixelRepresentation 1)
        ds.PixelData = pixels.tobytes()

    one_pet_slice(raw, change)
    return series_dir(raw, "PT")


def one_ct_slice_without_intercept(raw: Path) -> Path:
    return one_ct_slice(raw, lambda ds: delattr(ds, "RescaleIntercept"))


def one_ct_slice_with_a_nan_slope(raw: Path) -> Path:
    return one_ct_slice(raw, lambda ds: setattr(ds, "RescaleSlope", "NaN"))


def one_ct_slice_of_another_frame_of_reference(raw: Path) -> Path:
    return one_ct_slice(raw, lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4"))


def one_ct_slice_far_below_air(raw: Path) -> Path:
    one_ct_slice(raw, lambda ds: setattr(ds, "RescaleIntercept", "-3024"))
    return series_dir(raw, "CT")


def one_ct_slice_with_two_padding_values(raw: Path) -> Path:
    return one_ct_slice(raw, lambda ds: ds.add_new("PixelPaddingValue", "SS", [-2000, -1000]))


def seg_on_the_ct(raw: Path) -> Path:
    ct_uid = pydicom.dcmread(next(series_dir(raw, "CT").iterdir())).SeriesInstanceUID
    seg_file = next(series_dir(raw, "SEG").iterdir())
    edit(
        [seg_file], lambda ds: setattr(ds.ReferencedSeriesSequence[0], "SeriesInstanceUID", ct_uid)
    )
    return seg_file


def ct_without_pet(raw: Path) -> Path:
    shutil.rmtree(series_dir(raw, "PT"))
    return raw


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (corrupt_pet_file, "corrupt DICOM file"),
        (corrupt_pixel_data, "cannot decode pixel data"),
        (pet_without_radiopharmaceutical, "lacks RadionuclideTotalDose"),
        (pet_in_counts, "Units is 'CNTS'; only BQML"),
        (seg_on_the_ct, "SEG references series .* not the PET series"),
        (ct_without_pet, "expected exactly one PT series, found 0"),
        (
            one_pet_slice_in_counts,
            r"PET Units is CNTS in this slice but BQML in .*: a series "
            "mixing them cannot be converted to SUV",
        ),
        (
            one_pet_slice_without_radiopharmaceutical,
            "PET RadionuclideTotalDose is missing in this slice but ",
        ),
        (one_pet_slice_with_another_dose, "PET RadionuclideTotalDose is .* in this slice but"),
        (one_pet_slice_decay_corrected_to_admin, "PET DecayCorrection is ADMIN in this slice"),
        (one_pet_slice_with_an_intercept, "PET RescaleIntercept is -5; the standard requires 0"),
        (one_pet_slice_with_negative_pixels, r"SUV has 3 negative voxels \(min -"),
        (one_ct_slice_without_intercept, "CT slice lacks RescaleIntercept"),
        (
            one_ct_slice_with_a_nan_slope,
            "CT slice has RescaleSlope nan and RescaleIntercept "
            "-1024; the slope must be positive and both finite",
        ),
        (
            one_ct_slice_of_another_frame_of_reference,
            "CT slice FrameOfReferenceUID is '1.2.3.4', but .* a mixed series is refused",
        ),
        (
            one_ct_slice_far_below_air,
            r"CT has \d+ voxels outside the plausible range "
            r"\[-1100, 4000\] HU \(min -30",
        ),
        (
            one_ct_slice_with_two_padding_values,
            r"PixelPaddingValue \[-2000, -1000\] and PixelPaddingRangeLimit None: expected one "
            "integer each",
        ),
    ],
)
def test_bad_input_names_study_and_file_and_leaves_no_output(study, tmp_path, damage, message):
    study_id, raw = study
    copy = Path(shutil.copytree(raw, tmp_path / "raw"))
    bad_path = damage(copy)
    out = tmp_path / "nifti"
    outputs = outputs_in(out)
    out.mkdir()
    Path(outputs["SEG"]).write_bytes(b"left over from an earlier run")

    with pytest.raises(StudyError, match=message) as error:
        convert_study(study_id, copy, outputs, TRUTH_SETTINGS)

    assert f"study {study_id}" in str(error.value)
    assert str(bad_path) in str(error.value)
    assert list(out.iterdir()) == []
