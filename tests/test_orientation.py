"""Storage orientation does not change what stepseg computes: the same study stored with its axes
flipped or transposed (world space unchanged) gives identical converted files, step maps,
predictions (NIfTI and grand-challenge .mha forms) and metrics, each written back on its input's
own voxels. Copies are made here with numpy, independently of `stepseg.nifti`."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 (the conventional name)
import torch
from test_cli import save_random_model

from stepseg import cli, metrics, model, nifti, targets
from stepseg.convert import convert_study
from stepseg.names import NIFTI_NAMES, ORIENTATION
from stepseg.settings import ConvertSettings, TargetsSettings
from stepseg.sources import local
from stepseg.synthetic import source

pytestmark = pytest.mark.usefixtures("restore_logging")

# (name, permutation, flips) of the NIfTI axes (i, j, k): stored axis n is the original axis
# perm[n], then the stored axes in `flips` run backwards
STORAGES = [
    ("as converted", (0, 1, 2), ()),
    ("x flipped", (0, 1, 2), (0,)),
    ("y flipped (LAS, the release's)", (0, 1, 2), (1,)),
    ("z flipped", (0, 1, 2), (2,)),
    ("x and y transposed", (1, 0, 2), ()),
    ("z, x, y order, two flips", (2, 0, 1), (0, 2)),
]
ANGLE = np.deg2rad(25.0)
OBLIQUE = np.eye(4)  # a rotation about the scanner axis, far from the 45 degrees of a tie
OBLIQUE[:2, :2] = [[np.cos(ANGLE), -np.sin(ANGLE)], [np.sin(ANGLE), np.cos(ANGLE)]]


def stored_copy(data: np.ndarray, affine: np.ndarray, perm, flips) -> tuple[np.ndarray, np.ndarray]:
    """An (i, j, k) array and its affine stored another way, every voxel at its world place."""
    out = data.transpose(perm)
    index = np.eye(4)  # original voxel index = index @ stored voxel index
    index[:3, :3] = np.eye(3)[:, perm]
    for axis in flips:
        out = np.flip(out, axis)
        index[:3, 3] += index[:3, axis] * (out.shape[axis] - 1)
        index[:3, axis] *= -1
    return np.ascontiguousarray(out), affine @ index


def undo(data: np.ndarray, perm, flips) -> np.ndarray:
    """The original (i, j, k) array of a stored copy."""
    for axis in flips:
        data = np.flip(data, axis)
    return data.transpose(np.argsort(perm))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory, micro_synthetic_settings) -> tuple[str, Path, dict[str, Path]]:
    """A synthetic study with lesions: its DICOM folder and its conversion."""
    settings = micro_synthetic_settings
    row = next(r for r in source.list_studies(settings) if r["has_lesions"])
    raw = tmp_path_factory.mktemp("raw") / row["study_id"]
    raw.mkdir()
    source.fetch_study(settings, row, raw)
    out = tmp_path_factory.mktemp("nifti")
    outputs = {name: out / f"{name}.nii.gz" for name in NIFTI_NAMES}
    convert_study(row["study_id"], raw, outputs, ConvertSettings())
    return row["study_id"], raw, outputs


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A tiny network with random weights: nothing makes it flip- or transpose-invariant."""
    return save_random_model(tmp_path_factory.mktemp("model") / "model.pt", mask_prior=0.2)


def test_conversion_writes_the_canonical_orientation_whatever_the_dicom_order(study, tmp_path):
    """A CT series stored mirrored (rows right to left, hence slices head to feet) converts to
    the same files, in `ORIENTATION`."""
    study_id, raw, reference = study
    mirrored = tmp_path / "raw"
    shutil.copytree(raw, mirrored)
    ct_files = [
        p
        for p in mirrored.rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"
    ]
    for path in ct_files:
        ds = pydicom.dcmread(path)
        row = np.asarray(ds.ImageOrientationPatient[:3], float)
        shift = row * (ds.Columns - 1) * float(ds.PixelSpacing[1])
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ds.ImagePositionPatient) + shift]
        ds.ImageOrientationPatient = [*(-row).tolist(), *ds.ImageOrientationPatient[3:]]
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
        ds.save_as(path)
    outputs = {name: tmp_path / f"{name}.nii.gz" for name in NIFTI_NAMES}
    convert_study(study_id, mirrored, outputs, ConvertSettings())
    for name in NIFTI_NAMES:
        ours, theirs = nib.load(outputs[name]), nib.load(reference[name])
        assert "".join(nib.aff2axcodes(ours.affine)) == ORIENTATION, name
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), name)


@pytest.mark.parametrize("oblique", [False, True], ids=["axis-aligned", "oblique"])
def test_predict_gives_one_mask_however_the_study_is_stored(study, model_path, tmp_path, oblique):
    """`stepseg predict`, single NIfTI files and the grand-challenge .mha layout: each copy's mask
    is written on its own SUV voxels (its exact affine / ITK geometry) and, put back in the
    converted order, is identical to the mask of the study as converted."""
    study_id, _, converted = study
    suv_image, ct_image = nib.load(converted["SUV"]), nib.load(converted["CTres"])
    affine = OBLIQUE @ suv_image.affine if oblique else suv_image.affine
    gc_in, gc_out = tmp_path / "gc-in", tmp_path / "gc-out"
    for folder in ("pet", "ct"):
        (gc_in / "images" / folder).mkdir(parents=True)
    run = ["predict", "--model", str(model_path), "--device", "cpu", "--amp", "off"]
    masks = {}
    for k, (name, perm, flips) in enumerate(STORAGES):
        files = {}
        for kind, image in (("SUV", suv_image), ("CTres", ct_image)):
            data, stored_affine = stored_copy(np.asarray(image.dataobj), affine, perm, flips)
            files[kind] = tmp_path / f"{k}-{kind}.nii.gz"
            nib.save(nib.Nifti1Image(data, stored_affine), files[kind])
            folder = "pet" if kind == "SUV" else "ct"
            cli.write_image(  # as given: no stored affine, so no reorientation
                nifti.Volume(data.transpose(2, 1, 0), stored_affine),
                gc_in / "images" / folder / f"copy{k}.mha",
            )
        out = tmp_path / f"{k}-pred.nii.gz"
        single = ["--suv", str(files["SUV"]), "--ctres", str(files["CTres"]), "--out", str(out)]
        assert cli.main([*run, *single]) == 0
        written = nib.load(out)
        np.testing.assert_array_equal(written.affine, nib.load(files["SUV"]).affine)
        masks[name, "nifti"] = undo(np.asarray(written.dataobj), perm, flips)
    assert cli.main([*run, "--input-dir", str(gc_in), "--output-dir", str(gc_out)]) == 0
    for k, (name, perm, flips) in enumerate(STORAGES):
        written = sitk.ReadImage(str(gc_out / cli.GC_OUTPUT / f"copy{k}.mha"))
        given = sitk.ReadImage(str(gc_in / "images" / "pet" / f"copy{k}.mha"))
        for geometry in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(
                getattr(written, geometry)(), getattr(given, geometry)(), atol=1e-9
            )
        masks[name, "mha"] = undo(sitk.GetArrayFromImage(written).transpose(2, 1, 0), perm, flips)

    reference = masks[STORAGES[0][0], "nifti"].astype(bool)
    assert 0 < reference.sum() < reference.size / 2
    for (name, form), mask in masks.items():
        mask = mask.astype(bool)
        assert np.array_equal(mask, reference), (
            f"{study_id} stored {name} ({form}): Dice {dice(mask, reference):.3f} against the "
            "converted order"
        )


def test_step_map_is_written_on_the_suv_voxels_however_they_are_stored(study, tmp_path):
    study_id, _, converted = study
    images = {kind: nib.load(converted[kind]) for kind in ("SEG", "SUV", "CTres")}
    steps = {}
    for k, (name, perm, flips) in enumerate(STORAGES):
        paths = {}
        for kind, image in images.items():
            data, affine = stored_copy(np.asarray(image.dataobj), image.affine, perm, flips)
            paths[kind] = tmp_path / f"{k}-{kind}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), paths[kind])
        out = tmp_path / f"{k}-steps.nii.gz"
        targets.write_study_targets(
            study_id, paths["SEG"], paths["SUV"], paths["CTres"], out, tmp_path / f"{k}.png",
            TargetsSettings(preset="paper"),
        )  # fmt: skip
        written = nib.load(out)
        np.testing.assert_array_equal(written.affine, nib.load(paths["SUV"]).affine)
        steps[name] = undo(np.asarray(written.dataobj), perm, flips)
    reference = steps[STORAGES[0][0]]
    assert (reference == 0).any() and len(np.unique(reference)) > 3
    for name, array in steps.items():
        np.testing.assert_array_equal(array, reference, err_msg=f"stored {name}")


def test_release_stored_las_is_validated_and_evaluated_against_an_lps_prediction(study, tmp_path):
    """The nifti_dir source takes a study whose files are stored differently but on one grid,
    and evaluation compares SEG and prediction voxel by voxel whatever their storage."""
    study_id, _, converted = study
    folder = tmp_path / "PETCT_0a1b" / "03-14-2001-NA-PET-CT"
    folder.mkdir(parents=True)
    _, perm, flips = STORAGES[2]  # LAS, as the official conversion writes the release
    for name in NIFTI_NAMES:
        image = nib.load(converted[name])
        if name == "PET":  # this one left as converted (LPS)
            shutil.copy(converted[name], folder / f"{name}.nii.gz")
            continue
        data, affine = stored_copy(np.asarray(image.dataobj), image.affine, perm, flips)
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}.nii.gz")
    local.validate_nifti_study(study_id, folder)
    row = metrics.evaluate_study(  # the converted SEG (LPS) as the prediction of the LAS SEG
        study_id, folder / "SEG.nii.gz", folder / "SUV.nii.gz", converted["SEG"]
    )
    assert row["dice"] == 1.0
    assert row["fpv_ml"] == row["fnv_ml"] == 0.0 and row["tp_lesions"] > 0


def test_a_model_trained_in_another_orientation_is_refused(model_path, tmp_path):
    checkpoint = torch.load(model_path, weights_only=True)
    assert checkpoint["orientation"] == ORIENTATION == "LPS"
    older = dict(checkpoint)
    del older["orientation"]  # written before the field: trained on LPS conversions
    torch.save(older, tmp_path / "older.pt")
    model.load(tmp_path / "older.pt", torch.device("cpu"))
    torch.save({**checkpoint, "orientation": "LAS"}, tmp_path / "las.pt")
    with pytest.raises(ValueError, match=r"las\.pt was trained on images in LAS orientation, but"):
        model.load(tmp_path / "las.pt", torch.device("cpu"))
