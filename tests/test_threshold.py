import nibabel as nib
import numpy as np
import pytest

from stepseg import nifti, threshold
from stepseg.errors import StudyError
from stepseg.settings import ThresholdSettings

AFFINE = np.diag([-2.0, -2.0, 3.0, 1.0])


def _suv():
    suv = np.full((10, 12, 14), 1.0, np.float32)
    suv[2:4, 2:4, 2:4] = [[[5.0, 6.0], [4.0, 4.5]], [[10.0, 4.0], [4.0, 4.0]]]  # SUVmax 10
    suv[7, 8, 9] = 4.2  # single voxel
    return nifti.Volume(suv, AFFINE)


def test_fixed_threshold_keeps_voxels_at_or_above():
    mask = threshold.threshold_mask(_suv(), ThresholdSettings(suv=4.0))
    assert mask.dtype == np.uint8
    assert int(mask.sum()) == 9


def test_relative_threshold_applies_per_component_suvmax():
    mask = threshold.threshold_mask(_suv(), ThresholdSettings(suv=4.0, relative_to_max=0.41))
    # first component: cut 4.1 -> 5, 6, 4.5, 10 kept; single voxel 4.2 >= 0.41 * 4.2 kept
    assert int(mask[2:4, 2:4, 2:4].sum()) == 4
    assert mask[7, 8, 9] == 1


def test_min_volume_drops_small_components():
    vol = _suv()
    voxel_ml = vol.voxel_ml  # 12 mm^3 = 0.012 ml
    mask = threshold.threshold_mask(vol, ThresholdSettings(suv=4.0, min_volume_ml=2 * voxel_ml))
    assert int(mask.sum()) == 8
    assert mask[7, 8, 9] == 0


def test_predict_file_keeps_grid(tmp_path):
    path = tmp_path / "S1" / "SUV.nii.gz"
    nifti.save(_suv(), path)
    out = tmp_path / "pred" / "S1.nii.gz"
    threshold.predict_file(study="S1", suv_path=path, out_path=out, settings=ThresholdSettings())
    image = nib.load(out)
    assert image.shape == (14, 12, 10)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, AFFINE)
    assert int(np.asarray(image.dataobj).sum()) == 9


def test_missing_suv_names_the_study(tmp_path):
    with pytest.raises(StudyError, match=r"study S9, file .*SUV.nii.gz: file is missing"):
        threshold.predict_file(
            study="S9",
            suv_path=tmp_path / "S9" / "SUV.nii.gz",
            out_path=tmp_path / "o.nii.gz",
            settings=ThresholdSettings(),
        )
