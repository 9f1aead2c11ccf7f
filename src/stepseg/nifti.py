"""NIfTI I/O shared by every stage, and the one orientation every stage works in.

Convention: arrays inside stepseg are indexed (z, y, x) -- the order in which patch sizes such as
32x160x160 and structuring-element semi-axes are written. NIfTI stores (x, y, z); this module is the
only place that transposes. `load` (and `from_stored`, for images read otherwise) flips and
transposes every image into `stepseg.names.ORIENTATION` before any array work, because a network
sees arrays, not world coordinates: the same study stored LAS or transposed would otherwise be
segmented differently. `save` writes a volume back in the orientation and exact affine of the file
it came from (`Volume.stored_affine`), so outputs lie on their input's voxels. Flips and
transposes only, never resampling: an oblique image is brought to its nearest axes (as nibabel's
`as_closest_canonical`) and keeps its exact affine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from stepseg.atomic import atomic_file
from stepseg.errors import StudyError
from stepseg.names import ORIENTATION

AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Volume:
    """A (z, y, x) array with the NIfTI affine that places it in RAS millimetres.

    `stored_affine` is the affine of the file the volume was read from (None: not read from a
    file); `save` writes the array back in that file's orientation. `dataclasses.replace(volume,
    array=...)` gives an array on the same grid (a mask, a step map) the same way back.
    """

    array: np.ndarray
    affine: np.ndarray
    stored_affine: np.ndarray | None = None

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along (z, y, x), from the affine's column norms."""
        x, y, z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(z), float(y), float(x))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_zyx)) / 1000.0


def reorient(volume: Volume, axcodes: str = ORIENTATION) -> Volume:
    """The same voxels flipped and transposed so that the NIfTI axes (i, j, k) run towards
    `axcodes` (nearest axes of an oblique affine); the affine follows exactly."""
    xyz = volume.array.transpose(2, 1, 0)
    ornt = orientations.ornt_transform(
        orientations.io_orientation(volume.affine), orientations.axcodes2ornt(tuple(axcodes))
    )
    array = orientations.apply_orientation(xyz, ornt).transpose(2, 1, 0)
    affine = volume.affine @ orientations.inv_ornt_aff(ornt, xyz.shape)
    return replace(volume, array=np.ascontiguousarray(array), affine=affine)


def from_stored(array: np.ndarray, affine: np.ndarray) -> Volume:
    """The canonical volume of an image as stored ((k, j, i) array, its file's affine), keeping
    the file's affine for `to_stored`."""
    affine = np.asarray(affine, dtype=np.float64)
    return reorient(Volume(array, affine, stored_affine=affine))


def to_stored(volume: Volume) -> Volume:
    """`volume` in the orientation of the file it was read from, with that file's exact affine
    (unchanged when it was not read from a file)."""
    if volume.stored_affine is None:
        return volume
    stored = np.asarray(volume.stored_affine, dtype=np.float64)
    back = reorient(volume, "".join(orientations.aff2axcodes(stored)))
    if not np.allclose(back.affine, stored, atol=AFFINE_TOLERANCE_MM):
        raise ValueError(
            f"a volume of shape {volume.array.shape} does not lie on the grid of its stored "
            f"affine {stored.tolist()}"
        )
    return Volume(back.array, stored)


def load(path: str | Path, study: str, dtype: np.dtype | type | None = None) -> Volume:
    """Load a NIfTI file as (z, y, x) in `ORIENTATION`, remembering the file's affine;
    failures name the study and the file."""
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
    try:
        volume = from_stored(data.transpose(2, 1, 0), image.affine)
    except ValueError as exc:  # an affine without three independent axes
        raise StudyError(
            study, f"cannot orient affine {image.affine.tolist()} ({exc})", path
        ) from exc
    if dtype is not None:
        volume = replace(volume, array=volume.array.astype(dtype, copy=False))
    return volume


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
    """Write a (z, y, x) volume atomically (temp file, then rename), in the orientation and with
    the affine of the file it was read from (`to_stored`)."""
    volume = to_stored(volume)
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    with atomic_file(path) as tmp:
        nib.save(image, tmp)


def check_same_grid(study: str, volumes: dict[str, tuple[Path, Volume]]) -> None:
    """Refuse volumes that do not share one shape and affine (no silent resampling anywhere);
    loaded volumes are compared in `ORIENTATION`, so one grid stored two ways is one grid."""
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
