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
