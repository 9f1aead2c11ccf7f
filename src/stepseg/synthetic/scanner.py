"""What the scanner adds to the phantom: PET resolution and noise, CT noise and padding.

PET: the point-sampled SUV map gets signal-dependent (Poisson-like) noise whose level follows the
injected activity per kg and the decay during uptake, and then the gaussian point-spread function
(FWHM in mm, sigma per axis from the voxel spacing) blurs signal and noise together, so the noise
is correlated over the resolution as after iterative reconstruction with a post-filter. `pet_noise`
is the coefficient of variation after the blur, whatever the voxel size.

CT padding: a CT is reconstructed inside a circle inscribed in its square field of view; outside
it, scanners store a padding value that no tissue has (-3024 or -2048 HU) and name it in
PixelPaddingValue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from stepseg.synthetic.plan import F18_HALF_LIFE_S, StudyPlan

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
REFERENCE_SUV = 2.5  # `pet_noise` is the coefficient of variation at this SUV (liver)
CT_NOISE_HU = 12.0


def counts_factor(plan: StudyPlan) -> float:
    """Relative count level against a standard study (3.5 MBq/kg, 60 min uptake)."""
    activity_per_kg = plan.dose_bq / plan.weight_kg / 3.5e6
    decay = 2.0 ** (-(plan.uptake_s - 3600.0) / F18_HALF_LIFE_S)
    return activity_per_kg * decay


def pet_suv(
    suv_true: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    fwhm_mm: float,
    noise_cov: float,
    plan: StudyPlan,
    rng: np.random.Generator,
) -> np.ndarray:
    """The SUV a reconstruction would show: noisy, blurred, non-negative, float32."""
    sigma = fwhm_mm * FWHM_TO_SIGMA / np.asarray(spacing_zyx, float)
    # white noise loses the kernel's norm in the blur: scale it up so the blurred CoV is as asked
    scale = noise_cov * np.sqrt(REFERENCE_SUV / counts_factor(plan)) / _kernel_norm(sigma)
    noisy = rng.standard_normal(suv_true.shape, dtype=np.float32)
    noisy *= np.sqrt(np.maximum(suv_true, 0.0, dtype=np.float32))
    noisy *= np.float32(scale)
    noisy += suv_true
    blurred = ndimage.gaussian_filter(noisy, sigma, mode="constant", output=np.float32)
    return np.maximum(blurred, 0.0, out=blurred)


def _kernel_norm(sigma: np.ndarray) -> float:
    """Std of unit white noise after the gaussian filter: the L2 norm of its kernel."""
    half = int(np.ceil(4 * max(float(sigma.max()), 0.5)))
    impulse = np.zeros((2 * half + 1,) * 3, np.float64)
    impulse[half, half, half] = 1.0
    return float(np.linalg.norm(ndimage.gaussian_filter(impulse, sigma, mode="constant")))


def ct_hu(labels: np.ndarray, hu_table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT numbers (int16 HU) with quantum noise, computed slice by slice to bound memory."""
    result = np.empty(labels.shape, dtype=np.int16)
    for k in range(labels.shape[0]):
        slice_hu = rng.standard_normal(labels.shape[1:], dtype=np.float32)
        slice_hu *= np.float32(CT_NOISE_HU)
        slice_hu += hu_table[labels[k]]
        result[k] = np.clip(np.rint(slice_hu), -1024, 3071)
    return result


def pad_outside_circle(hu: np.ndarray, spacing_zyx: tuple[float, float, float], value: int) -> None:
    """Set `hu` (z, y, x) to `value` outside the reconstruction circle, in place: the circle
    inscribed in the in-plane field of view, centred on it."""
    _, ny, nx = hu.shape
    _, dy, dx = spacing_zyx
    y = (np.arange(ny) - (ny - 1) / 2) * dy
    x = (np.arange(nx) - (nx - 1) / 2) * dx
    radius = min(ny * dy, nx * dx) / 2
    hu[:, y[:, None] ** 2 + x[None, :] ** 2 > radius**2] = value
