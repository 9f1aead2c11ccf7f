import numpy as np
import pytest
import torch

from stepseg.normalize import ct_from_normalized, normalize_batch


def reference_pet(suv: np.ndarray) -> np.ndarray:
    """The released code's per-patch PET formula, restated in float64 numpy."""
    log_suv = np.log2(suv.astype(np.float64) + 1)
    foreground = log_suv[log_suv > 0.14]  # utils_data_proc.z_norm thresholds the log image
    mean, std = (foreground.mean(), max(foreground.std(), 0.01)) if foreground.size else (0, 1)
    return (log_suv - mean) / std / 2 + 1


def reference_ct(hu: np.ndarray) -> np.ndarray:
    return (np.clip(hu.astype(np.float64), -1000, 1000) + 1000) / 500


def batch_of(*patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(patches)[:, None])


def test_ct_formula():
    hu = np.array([-3000, -1024, -1000, -500, 0, 40, 1000, 1001, 3071], dtype=np.int16)
    expected = np.array([0, 0, 0, 1, 2, 2.08, 4, 4, 4], dtype=np.float32)
    out = normalize_batch(torch.zeros(1, 1, 9), torch.from_numpy(hu)[None, None])
    assert out.shape == (1, 2, 9) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0, 1].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(ct_from_normalized(expected[3:6]), [-500, 0, 40], atol=1e-4)


def test_batch_equals_the_per_sample_formula_for_mixed_samples():
    """Body, hot lesion, air only and a float16 body in one batch: each its own statistics."""
    rng = np.random.default_rng(0)
    shape = (6, 20, 24)
    body = rng.gamma(1.5, 1.2, size=shape).astype(np.float32)
    body[:2] = 0  # air
    hot = body * 3
    hot[3, 4, 5] = 48.0  # a hot lesion
    air = np.full(shape, 0.1, dtype=np.float32)  # log2(1.1) = 0.1375 <= 0.14: mean 0, std 1
    body16 = rng.gamma(2.0, 0.8, size=shape).astype(np.float16).astype(np.float32)
    suv = [body, hot, air, body16]
    hu = [rng.integers(-3000, 3000, shape).astype(np.int16) for _ in suv]
    out = normalize_batch(batch_of(*suv), batch_of(*hu))
    assert out.shape == (4, 2, *shape) and out.dtype == torch.float32
    for k in range(4):
        np.testing.assert_allclose(out[k, 0].numpy(), reference_pet(suv[k]), atol=2e-5)
        np.testing.assert_allclose(out[k, 1].numpy(), reference_ct(hu[k]), atol=1e-6)
    np.testing.assert_allclose(out[2, 0].numpy(), np.log2(1.1) / 2 + 1, rtol=1e-6)
    alone = normalize_batch(batch_of(body), batch_of(hu[0]))  # batch company changes nothing
    torch.testing.assert_close(alone[0], out[0])


def test_stored_dtypes_give_the_same_result_as_float32():
    """The loader's float16 SUV and int16 HU, converted inside, equal float32 inputs."""
    rng = np.random.default_rng(1)
    suv16 = rng.gamma(1.5, 1.2, size=(2, 1, 4, 8, 8)).astype(np.float16)
    hu16 = rng.integers(-1100, 1100, size=(2, 1, 4, 8, 8)).astype(np.int16)
    compact = normalize_batch(torch.from_numpy(suv16), torch.from_numpy(hu16))
    wide = normalize_batch(
        torch.from_numpy(suv16.astype(np.float32)), torch.from_numpy(hu16.astype(np.float32))
    )
    torch.testing.assert_close(compact, wide, rtol=0, atol=0)
    for k in range(2):
        np.testing.assert_allclose(compact[k, 0].numpy(), reference_pet(suv16[k, 0]), atol=2e-5)


def test_std_floor_and_all_air_batch():
    uniform = np.full((4, 5, 6), 3.0, dtype=np.float32)
    uniform[0, 0, 0] = 0.0  # below the foreground threshold: excluded from the statistics
    air = np.zeros((4, 5, 6), dtype=np.float32)
    out = normalize_batch(batch_of(uniform, air), torch.zeros(2, 1, 4, 5, 6))
    assert float(out[0, 0, 1, 1, 1]) == pytest.approx(1.0)  # z = 0 at the mean
    # std floored at 0.01: SUV 0 is log2(1) = 0, two units below the mean log2(4) = 2
    assert float(out[0, 0, 0, 0, 0]) == pytest.approx((0 - 2) / 0.01 / 2 + 1)
    assert (out[1, 0] == 1.0).all()  # pure air: log2(1) = 0 with mean 0, std 1
    only_air = normalize_batch(torch.zeros(3, 1, 2, 2, 2), torch.full((3, 1, 2, 2, 2), -1024))
    assert torch.isfinite(only_air).all() and (only_air[:, 0] == 1).all()
    assert (only_air[:, 1] == 0).all()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="equal shape"):
        normalize_batch(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 5))
    with pytest.raises(ValueError, match=r"\(B, 1, \.\.\.\)"):
        normalize_batch(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4))
