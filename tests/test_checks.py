"""Input checks: NaN, infinite and negative SUV, implausible CT, grid mismatches, the HU range."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from stepseg import checks, nifti
from stepseg.errors import StudyError

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([-4.0, -4.0, 3.0, 1.0])
SUV_PATH, CTRES_PATH = Path("s/SUV.nii.gz"), Path("s/CTres.nii.gz")


def pair(suv=None, ct=None, ct_affine=AFFINE):
    suv = np.ones((3, 4, 5), np.float32) if suv is None else suv
    ct = np.zeros((3, 4, 5), np.float32) if ct is None else ct
    return (SUV_PATH, nifti.Volume(suv, AFFINE)), (CTRES_PATH, nifti.Volume(ct, ct_affine))


def test_plausible_inputs_pass():
    suv = np.zeros((3, 4, 5), np.float32)
    ct = np.full((3, 4, 5), -1100.0, np.float32)
    ct[0, 0, 0] = 4000.0  # both bounds are inclusive
    checks.check_suv_ctres("PETCT_1", *pair(suv, ct))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "study PETCT_1, file s/SUV.nii.gz: SUV has 2 NaN and 0 infinite voxels"),
        (np.inf, "study PETCT_1, file s/SUV.nii.gz: SUV has 0 NaN and 2 infinite voxels"),
        (-0.5, r"study PETCT_1, file s/SUV.nii.gz: SUV has 2 negative voxels \(min -0.5\)"),
    ],
)
def test_bad_suv_is_refused_naming_study_and_file(value, message):
    suv = np.ones((3, 4, 5), np.float32)
    suv[1, 2, 3] = suv[0, 0, 0] = value
    with pytest.raises(StudyError, match=message):
        checks.check_suv_ctres("PETCT_1", *pair(suv=suv))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, r"CTres has 1 NaN and 0 infinite voxels"),
        (-np.inf, r"CTres has 0 NaN and 1 infinite voxels"),
        (
            -1101.0,
            r"CTres has 1 voxels outside the plausible range \[-1100, 4000\] HU \(min -1101, "
            r"max 0\); if the scanner really stores such values, widen checks.ct_hu_range",
        ),
        (4000.5, r"CTres has 1 voxels outside .* \(min 0, max 4000.5\)"),
    ],
)
def test_bad_ctres_is_refused_naming_study_and_file(value, message):
    ct = np.zeros((3, 4, 5), np.float32)
    ct[2, 3, 4] = value
    with pytest.raises(StudyError, match="study PETCT_1, file s/CTres.nii.gz: " + message):
        checks.check_suv_ctres("PETCT_1", *pair(ct=ct))


def test_a_wider_range_accepts_what_the_default_refuses():
    ct = np.full((3, 4, 5), -5000.0, np.float32)
    with pytest.raises(StudyError, match=r"CT has 60 voxels outside .* \(min -5000, max -5000\)"):
        checks.check_ct("PETCT_1", ct, CTRES_PATH)
    checks.check_ct("PETCT_1", ct, CTRES_PATH, (-5000.0, 4000.0))


def padded_ct(padding: float) -> np.ndarray:
    """A CTres slab of soft tissue with scanner padding in two corners of every slice."""
    ct = np.full((3, 4, 5), 40.0, np.float32)
    ct[:, 0, 0] = ct[:, -1, -1] = padding
    return ct


@pytest.mark.parametrize("padding", [-3024.0, -2048.0])
def test_scanner_padding_passes_whatever_the_range(padding):
    checks.check_suv_ctres("PETCT_1", *pair(ct=padded_ct(padding)))
    checks.check_ct("PETCT_1", padded_ct(padding), CTRES_PATH, (-3024.0, 4000.0))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, r"CTres has 1 NaN and 0 infinite voxels"),
        (np.inf, r"CTres has 0 NaN and 1 infinite voxels"),
        (-5000.0, r"CTres has 1 voxels outside .* HU \(min -5000, max 40\); if the scanner"),
        (40000.0, r"CTres has 1 voxels outside .* HU \(min -3024, max 40000\); if the scanner"),
        (-3023.0, r"CTres has 1 voxels outside .* HU \(min -3024, max 40\); if the scanner"),
    ],
)
def test_padding_excuses_no_other_value(value, message):
    ct = padded_ct(-3024.0)
    ct[1, 2, 3] = value
    with pytest.raises(StudyError, match="study PETCT_1, file s/CTres.nii.gz: " + message):
        checks.check_suv_ctres("PETCT_1", *pair(ct=ct))


def test_padding_and_only_padding_becomes_air():
    ct = np.array([-3024.0, -2048.0, -3023.0, -2048.5, -1024.0, 0.0, 3071.0], np.float32)
    air = checks.air_for_padding(ct)
    assert air.dtype == np.float32
    np.testing.assert_array_equal(air, [-1024.0, -1024.0, -3023.0, -2048.5, -1024.0, 0.0, 3071.0])
    assert ct[0] == -3024.0  # the input is left alone
    stored = np.array([-3024, -2048, 7], np.int16)
    np.testing.assert_array_equal(checks.air_for_padding(stored), [-1024, -1024, 7])


def test_grid_mismatch_is_refused_before_the_values():
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    with pytest.raises(StudyError, match=r"file s/CTres\.nii\.gz: CTres affine differs from SUV"):
        checks.check_suv_ctres("PETCT_1", *pair(suv=np.full((3, 4, 5), np.nan), ct_affine=shifted))
    with pytest.raises(StudyError, match=r"CTres shape \(3, 4, 6\) \(z, y, x\) differs"):
        checks.check_suv_ctres("PETCT_1", *pair(ct=np.zeros((3, 4, 6), np.float32)))


def test_configured_range_and_its_default_agree():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert tuple(config["checks"]["ct_hu_range"]) == checks.CT_HU_RANGE == (-1100.0, 4000.0)
    assert checks.ct_hu_range(config) == (-1100.0, 4000.0)
    assert checks.ct_hu_range({}) == checks.CT_HU_RANGE
    assert checks.ct_hu_range({"checks": {"ct_hu_range": [-3024, 30000]}}) == (-3024.0, 30000.0)
