from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from stepseg import nifti
from stepseg.errors import StudyError


def volume(shape=(4, 5, 6), spacing=(3.0, 2.0, 1.5)) -> nifti.Volume:
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return nifti.Volume(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), affine)


def test_save_load_round_trip_is_zyx(tmp_path):
    vol = volume()
    nifti.save(vol, tmp_path / "a.nii.gz")
    on_disk = nib.load(tmp_path / "a.nii.gz")
    assert on_disk.shape == (6, 5, 4)  # NIfTI stores (x, y, z)
    assert on_disk.get_fdata()[5, 4, 3] == vol.array[3, 4, 5]
    back = nifti.load(tmp_path / "a.nii.gz", study="S1")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine)
    assert back.spacing_zyx == (3.0, 2.0, 1.5)
    assert back.voxel_ml == pytest.approx(0.009)


def test_load_names_study_and_file(tmp_path):
    with pytest.raises(StudyError, match=r"study S7, file .*missing\.nii\.gz: file is missing"):
        nifti.load(tmp_path / "missing.nii.gz", study="S7")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(StudyError, match=r"study S7, file .*bad\.nii\.gz: cannot read NIfTI"):
        nifti.load(tmp_path / "bad.nii.gz", study="S7")


def test_check_same_grid_refuses_shape_and_affine_mismatch(tmp_path):
    ref = volume()
    other_shape = volume(shape=(4, 5, 7))
    shifted = nifti.Volume(ref.array, ref.affine + np.pad(np.ones((3, 1)), ((0, 1), (3, 0))))
    nifti.check_same_grid("S2", {"SUV": (tmp_path / "SUV", ref), "SEG": (tmp_path / "SEG", ref)})
    with pytest.raises(StudyError, match=r"study S2, file .*SEG: SEG shape \(4, 5, 7\)"):
        nifti.check_same_grid(
            "S2", {"SUV": (tmp_path / "SUV", ref), "SEG": (tmp_path / "SEG", other_shape)}
        )
    with pytest.raises(StudyError, match="SEG affine differs from SUV affine"):
        nifti.check_same_grid(
            "S2", {"SUV": (tmp_path / "SUV", ref), "SEG": (tmp_path / "SEG", shifted)}
        )


def test_load_brings_any_storage_to_lps_and_save_writes_the_files_own_back(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # (i, j, k) as stored
    affine = np.array([[0, 0, 3.0, -5], [2.0, 0, 0, 7], [0, -1.5, 0, 11], [0, 0, 0, 1]])  # AIR
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "asi.nii.gz")
    loaded = nifti.load(tmp_path / "asi.nii.gz", "S3")
    assert nib.aff2axcodes(loaded.affine) == ("L", "P", "S")
    # LPS (i, j, k) = stored (k, i, j), each reversed; the array is its (z, y, x)
    expected_ijk = data.transpose(2, 0, 1)[::-1, ::-1, ::-1]
    np.testing.assert_array_equal(loaded.array, expected_ijk.transpose(2, 1, 0))
    for ijk in np.ndindex(*expected_ijk.shape):  # every voxel keeps its world position
        stored = np.argwhere(data == expected_ijk[ijk])[0]
        np.testing.assert_allclose(
            loaded.affine @ [*ijk, 1], affine @ [*stored, 1], atol=1e-6, err_msg=str(ijk)
        )
    nifti.save(replace(loaded, array=loaded.array * 2), tmp_path / "out.nii.gz")
    written = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(written.affine, nib.load(tmp_path / "asi.nii.gz").affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), data * 2)


def test_an_affine_without_three_axes_is_refused_by_file(tmp_path):
    image = nib.Nifti1Image(np.zeros((2, 3, 4)), None)
    image.set_sform(np.diag([0.0, 2, 3, 1]), code=1)  # a qform cannot even hold it
    nib.save(image, tmp_path / "flat.nii")
    with pytest.raises(StudyError, match=r"study S8, file .*flat\.nii: cannot orient affine"):
        nifti.load(tmp_path / "flat.nii", "S8")
