"""What the scanner adds to the phantom: PET resolution and noise, CT noise.

PET: the point-sampled SUV map is blurred with a gaussian point-spread function (FWHM in mm,
sigma per axis from the voxel spacing), then gets signal-dependent (Poisson-like) noise whose
level follows the injected activity per kg and the decay during uptake, spatially correlated over
about a voxel as after iterative reconstruction with a post-filter.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from stepseg.synthetic.plan import F18_HALF_LIFE_S, StudyPlan

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
REFERENCE_SUV = 2.5  # `pet_noise` is the coefficient of variation at this SUV (liver)
NOISE_CORRELATION_VOXELS = 0.6
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
    """The SUV a reconstruction would show: blurred, noisy, non-negative, float32."""
    sigma = fwhm_mm * FWHM_TO_SIGMA / np.asarray(spacing_zyx, float)
    blurred = ndimage.gaussian_filter(suv_true.astype(np.float32), sigma, mode="constant")
    white = rng.standard_normal(suv_true.shape, dtype=np.float32)
    correlated = ndimage.gaussian_filter(white, NOISE_CORRELATION_VOXELS, mode="constant")
    correlated /= _filtered_noise_std(NOISE_CORRELATION_VOXELS)
    scale = noise_cov * np.sqrt(REFERENCE_SUV / counts_factor(plan))
    noisy = blurred + scale * np.sqrt(np.maximum(blurred, 0.0)) * correlated
    return np.maximum(noisy, 0.0).astype(np.float32)


def _filtered_noise_std(sigma: float) -> float:
    """Std of unit white noise after the 3-D gaussian filter: the norm of its kernel."""
    impulse = np.zeros((15, 15, 15), np.float64)
    impulse[7, 7, 7] = 1.0
    return float(np.linalg.norm(ndimage.gaussian_filter(impulse, sigma, mode="constant")))


def ct_hu(labels: np.ndarray, hu_table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT numbers (int16 HU) with quantum noise, computed slice by slice to bound memory."""
    result = np.empty(labels.shape, dtype=np.int16)
    for k in range(labels.shape[0]):
        noise = rng.normal(0.0, CT_NOISE_HU, labels.shape[1:]).astype(np.float32)
        result[k] = np.clip(np.rint(hu_table[labels[k]] + noise), -1024, 3071)
    return result
