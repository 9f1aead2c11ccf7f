"""NIfTI I/O shared by every stage.

Convention: arrays inside stepseg are indexed (z, y, x) -- the order in which patch sizes such as
32x160x160 and structuring-element semi-axes are written. NIfTI stores (x, y, z); this module is the
only place that transposes. Affines are always the NIfTI (RAS) affine of the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from stepseg.atomic import atomic_file
from stepseg.errors import StudyError

AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Volume:
    """A (z, y, x) array with the NIfTI affine that places it in RAS millimetres."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along (z, y, x), from the affine's column norms."""
        x, y, z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(z), float(y), float(x))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_zyx)) / 1000.0


def load(path: str | Path, study: str, dtype: np.dtype | type | None = None) -> Volume:
    """Load a NIfTI file as (z, y, x); failures name the study and the file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(study, "file is missing", path)
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise StudyError(study, f"cannot read NIfTI ({exc})", path) from exc
    if data.ndim != 3:
        raise StudyError(study, f"expected a 3-D volume, found shape {data.shape}", path)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Volume(array=array, affine=np.asarray(image.affine, dtype=np.float64))


def header(path: str | Path, study: str) -> nib.Nifti1Header:
    """The header of a NIfTI file, no voxels read (sizes, spacing); failures name the study and
    the file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(study, "file is missing", path)
    try:
        return nib.load(path).header
    except Exception as exc:
        raise StudyError(study, f"cannot read NIfTI header ({exc})", path) from exc


def save(volume: Volume, path: str | Path, dtype: np.dtype | type | None = None) -> None:
    """Write a (z, y, x) volume atomically (temp file, then rename)."""
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    with atomic_file(path) as tmp:
        nib.save(image, tmp)


def check_same_grid(study: str, volumes: dict[str, tuple[Path, Volume]]) -> None:
    """Refuse volumes that do not share one shape and affine (no silent resampling anywhere)."""
    (ref_name, (ref_path, ref)), *others = volumes.items()
    for name, (path, vol) in others:
        if vol.array.shape != ref.array.shape:
            raise StudyError(
                study,
                f"{name} shape {vol.array.shape} (z, y, x) differs from {ref_name} "
                f"shape {ref.array.shape} ({ref_path})",
                path,
            )
        if not np.allclose(vol.affine, ref.affine, atol=AFFINE_TOLERANCE_MM):
            raise StudyError(
                study, f"{name} affine differs from {ref_name} affine ({ref_path})", path
            )
