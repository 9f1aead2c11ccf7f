import numpy as np
import pytest
import torch

from stepseg.normalize import ct_from_normalized, normalize_ct, normalize_pet


def reference_pet(suv: np.ndarray) -> np.ndarray:
    log_suv = np.log2(suv.astype(np.float64) + 1)
    foreground = log_suv[suv > 0.14]
    mean, std = (foreground.mean(), max(foreground.std(), 0.01)) if foreground.size else (0, 1)
    return (log_suv - mean) / std / 2 + 1


def test_ct_formula_numpy_and_torch_agree():
    hu = np.array([-3000, -1024, -1000, -500, 0, 40, 1000, 1001, 3071], dtype=np.int16)
    expected = np.array([0, 0, 0, 1, 2, 2.08, 4, 4, 4], dtype=np.float32)
    np.testing.assert_allclose(normalize_ct(hu), expected, rtol=1e-6)
    assert normalize_ct(hu).dtype == np.float32
    torch_out = normalize_ct(torch.from_numpy(hu))
    assert isinstance(torch_out, torch.Tensor) and torch_out.dtype == torch.float32
    np.testing.assert_array_equal(torch_out.numpy(), normalize_ct(hu))
    np.testing.assert_allclose(ct_from_normalized(expected[3:6]), [-500, 0, 40], atol=1e-4)


def test_pet_matches_the_formula_for_float16_float32_and_torch():
    rng = np.random.default_rng(0)
    suv = rng.gamma(1.5, 1.2, size=(6, 20, 24)).astype(np.float32)
    suv[:2] = 0  # air
    suv[3, 4, 5] = 48.0  # a hot lesion
    expected = reference_pet(suv)
    np.testing.assert_allclose(normalize_pet(suv), expected, atol=2e-5)
    np.testing.assert_allclose(normalize_pet(torch.from_numpy(suv)).numpy(), expected, atol=2e-5)
    suv16 = suv.astype(np.float16)
    np.testing.assert_allclose(normalize_pet(suv16), reference_pet(suv16), atol=2e-5)


def test_pet_std_floor_and_air_only_patch():
    uniform = np.full((4, 5, 6), 3.0, dtype=np.float32)
    uniform[0, 0, 0] = 0.0  # below the foreground threshold: excluded from the statistics
    out = normalize_pet(uniform)
    assert out[1, 1, 1] == pytest.approx(1.0)  # z = 0 at the mean
    # std floored at 0.01: SUV 0 is log2(1) = 0, two units below the mean log2(4) = 2
    assert out[0, 0, 0] == pytest.approx((0 - 2) / 0.01 / 2 + 1)
    air = np.full((3, 4, 4), 0.1, dtype=np.float32)  # nothing above 0.14: mean 0, std 1
    np.testing.assert_allclose(normalize_pet(air), np.log2(1.1) / 2 + 1, rtol=1e-6)


def test_out_buffer_receives_the_result():
    suv = torch.rand(2, 3, 4) * 5
    buffer = torch.empty(2, 3, 4)
    result = normalize_pet(suv, out=buffer)
    assert result.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, normalize_pet(suv))
    with pytest.raises(ValueError, match="float32 of shape"):
        normalize_ct(torch.zeros(2, 3, 4), out=torch.empty(3, 3, 4))
