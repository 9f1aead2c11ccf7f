"""Input checks shared by convert, pack, infer and `stepseg predict`: refuse what would give a
plausible-looking wrong answer instead of a clear error.

A single NaN spreads through every sliding window that contains it and erases true lesions far
from it; a negative SUV or a CT value no scanner produces means a broken conversion or a wrong
rescale. Each check names the study and the file. The padding values scanners store outside the
CT's reconstruction circle (`names.CT_PADDING_HU`) are no such error: they are air
(`air_for_padding`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stepseg import nifti
from stepseg.errors import StudyError
from stepseg.names import AIR_HU, CT_PADDING_HU
from stepseg.settings import ChecksSettings

# The default plausible CT range (`checks.ct_hu_range`); see ChecksSettings for why.
CT_HU_RANGE: tuple[float, float] = ChecksSettings().ct_hu_range


def ct_hu_range(config: Mapping[str, Any]) -> tuple[float, float]:
    """The configured plausible CT range (`checks.ct_hu_range`), else `CT_HU_RANGE`.

    Read by the entry scripts from the whole config rather than passed as a rule parameter: the
    range decides only whether a job fails, never what it writes, so it is no rerun trigger.
    """
    return ChecksSettings.from_mapping(config.get("checks", {})).ct_hu_range


def _non_finite(study: str, name: str, array: np.ndarray, path: str | Path) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        raise StudyError(
            study,
            f"{name} has {nan} NaN and {int(finite.size - finite.sum()) - nan} infinite voxels",
            path,
        )


def check_suv(study: str, suv: np.ndarray, path: str | Path) -> None:
    """NaN, infinite or negative SUV means a broken conversion: refuse it."""
    _non_finite(study, "SUV", suv, path)
    negative = int((suv < 0).sum())
    if negative:
        raise StudyError(
            study, f"SUV has {negative} negative voxels (min {float(suv.min()):.3g})", path
        )


def air_for_padding(ct: np.ndarray) -> np.ndarray:
    """`ct` with the scanners' padding values (`CT_PADDING_HU`, exactly) as air (`AIR_HU`): the
    network was trained on air there, and no tissue has these values."""
    return np.where(np.isin(ct, CT_PADDING_HU), np.asarray(AIR_HU, ct.dtype), ct)


def check_ct(
    study: str,
    ct: np.ndarray,
    path: str | Path,
    hu_range: tuple[float, float] = CT_HU_RANGE,
    name: str = "CT",
) -> None:
    """NaN, infinite or implausible CT numbers (outside `hu_range` HU) mean a wrong rescale;
    the padding values of `CT_PADDING_HU` are accepted (as air, see `air_for_padding`)."""
    _non_finite(study, name, ct, path)
    low, high = hu_range
    outside = int((((ct < low) | (ct > high)) & ~np.isin(ct, CT_PADDING_HU)).sum())
    if outside:
        raise StudyError(
            study,
            f"{name} has {outside} voxels outside the plausible range [{low:g}, {high:g}] HU "
            f"(min {float(ct.min()):g}, max {float(ct.max()):g}); if the scanner really stores "
            "such values, widen checks.ct_hu_range",
            path,
        )


def check_suv_ctres(
    study: str,
    suv: tuple[Path, nifti.Volume],
    ctres: tuple[Path, nifti.Volume],
    hu_range: tuple[float, float] = CT_HU_RANGE,
) -> None:
    """The network's two inputs: one grid, finite non-negative SUV, plausible CTres."""
    nifti.check_same_grid(study, {"SUV": suv, "CTres": ctres})
    check_suv(study, suv[1].array, suv[0])
    check_ct(study, ctres[1].array, ctres[0], hu_range, "CTres")
