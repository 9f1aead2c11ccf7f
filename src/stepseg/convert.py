"""One study's DICOM series -> the five autoPET NIfTI files (CT, PET, SUV, CTres, SEG).

Every volume is built and checked in memory before anything is written, and the five files are
renamed into place together at the end, so a bad study leaves no output behind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np

from stepseg import checks, dicom
from stepseg.atomic import atomic_file
from stepseg.errors import StudyError
from stepseg.names import AIR_HU, NIFTI_NAMES
from stepseg.nifti import Volume, reorient, save
from stepseg.settings import ConvertSettings

log = logging.getLogger(__name__)

INTERPOLATION_ORDER = {"linear": 1, "nearest": 0}


def resample_ct_to_pet(
    ct: Volume, pet_shape: tuple[int, int, int], pet_affine: np.ndarray, interpolation: str
) -> Volume:
    """CT resampled onto the PET grid (CTres), air outside the CT field of view."""
    ct_image = nib.Nifti1Image(ct.array.transpose(2, 1, 0), ct.affine)
    resampled = nibabel.processing.resample_from_to(
        ct_image,
        (pet_shape[::-1], pet_affine),
        order=INTERPOLATION_ORDER[interpolation],
        mode="constant",
        cval=AIR_HU,  # outside the CT's field of view, as in the autoPET release
    )
    array = np.asarray(resampled.dataobj, dtype=np.float32).transpose(2, 1, 0)
    return Volume(np.ascontiguousarray(array), pet_affine)


def convert_study(
    study: str,
    raw_dir: str | Path,
    outputs: Mapping[str, str | Path],
    settings: ConvertSettings,
    *,
    ct_hu_range: tuple[float, float] = checks.CT_HU_RANGE,
) -> None:
    """Convert `raw_dir` (DICOM series in any folder layout) to the NIfTI files in `outputs`.

    SUV, CTres and SEG share the PET grid exactly. CT padding is air (-1024 HU) in CT and CTres.
    Every file is written in `stepseg.names.ORIENTATION` (flips and transposes of the series' own
    order, no resampling); nothing before needs it: SUV scaling and the checks are voxelwise, CTres
    is resampled in world space and SEG frames are placed by position.
    Non-finite or negative SUV and CT numbers outside `ct_hu_range` are refused, naming the
    series folder (CTres interpolates the CT and air, so it stays inside the CT's range).
    """
    missing = set(NIFTI_NAMES) - set(outputs)
    if missing:
        raise ValueError(f"outputs lacks {sorted(missing)}")
    targets = {name: Path(outputs[name]) for name in NIFTI_NAMES}
    for path in targets.values():  # all five or none: never keep a previous run's files
        path.unlink(missing_ok=True)

    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise StudyError(study, "raw study folder is missing", raw_dir)
    series = dicom.find_series(study, raw_dir)
    pet = dicom.stack_slices(study, dicom.select_series(study, series, "PT", raw_dir))
    ct = dicom.stack_slices(study, dicom.select_series(study, series, "CT", raw_dir))
    seg = dicom.select_series(study, series, "SEG", raw_dir)

    factor = dicom.suv_factor(study, pet, settings.suv_reference_time)
    mask = dicom.decode_seg(study, seg, pet)
    pet_bqml = dicom.read_volume(study, pet)
    suv = pet_bqml * np.float32(factor)
    checks.check_suv(study, suv, pet.first_path.parent)
    # padding outside the reconstruction circle is air before anything is resampled, whether
    # the slices tag it (PixelPaddingValue) or only hold the usual values (names.CT_PADDING_HU)
    hu = checks.air_for_padding(dicom.read_volume(study, ct, padding_as=AIR_HU))
    ct_volume = Volume(hu, ct.affine)
    checks.check_ct(study, ct_volume.array, ct.first_path.parent, ct_hu_range)
    volumes = {
        "CT": (Volume(np.rint(ct_volume.array), ct.affine), np.int16),
        "PET": (Volume(pet_bqml, pet.affine), np.float32),
        "SUV": (Volume(suv, pet.affine), np.float32),
        "CTres": (
            resample_ct_to_pet(ct_volume, pet.shape, pet.affine, settings.ctres_interpolation),
            np.float32,
        ),
        "SEG": (Volume(mask, pet.affine), np.uint8),
    }
    log.info(
        "study %s: PET %s, CT %s, SUV factor %.6g g/Bq, %d lesion voxels",
        study,
        pet.shape,
        ct.shape,
        factor,
        int(mask.sum()),
    )
    with ExitStack() as stack:  # rename all five only after all five are written
        for name, (volume, dtype) in volumes.items():
            save(reorient(volume), stack.enter_context(atomic_file(targets[name])), dtype)
