"""Whether a resampled CT sits where it should: errors inside the body, not over the air.

A synthetic study is ~95 % air, so an error over the whole volume is small even for a CTres that
is transposed, flipped or shifted by centimetres. Inside the body (truth above -900 HU) the true
geometry must also beat the same volume moved by one voxel along any axis and flipped along any
axis: a wrong geometry that happens to score well on a symmetric body still loses to the truth.
"""

from __future__ import annotations

import numpy as np

BODY_HU = -900.0


def body_errors(ctres: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean |CTres - truth| inside the body for the CTres as given ("as_is") and moved/flipped."""
    assert ctres.shape == truth.shape, (ctres.shape, truth.shape)
    body = truth > BODY_HU
    assert body.any()

    def mean_error(candidate: np.ndarray) -> float:
        return float(np.mean(np.abs(candidate[body].astype(np.float64) - truth[body])))

    errors = {"as_is": mean_error(ctres)}
    for axis in range(3):
        for step in (-1, 1):
            errors[f"shift axis {axis} by {step:+d}"] = mean_error(np.roll(ctres, step, axis=axis))
        errors[f"flip axis {axis}"] = mean_error(np.flip(ctres, axis=axis))
    return errors


def median_body_error(ctres: np.ndarray, truth: np.ndarray) -> float:
    body = truth > BODY_HU
    return float(np.median(np.abs(ctres[body].astype(np.float64) - truth[body])))


def assert_ctres_geometry(ctres: np.ndarray, truth: np.ndarray, median_hu: float = 20.0) -> None:
    """Median error inside the body below `median_hu`, and the true geometry beats every move."""
    median = median_body_error(ctres, truth)
    assert median < median_hu, f"median |CTres - truth| inside the body is {median:.1f} HU"
    errors = body_errors(ctres, truth)
    as_is = errors.pop("as_is")
    worst = min(errors, key=errors.get)
    assert as_is < errors[worst], (
        f"mean error inside the body {as_is:.1f} HU is not below {worst} ({errors[worst]:.1f} HU)"
    )
