"""The targets stage: one study's step map (uint8 NIfTI on the SUV grid) and its QC figure.

The step map of the whole study (`stepseg.stepmap`, schedule from `stepseg.presets`) is what the
pack rule stores; training uses its lesion voxels and rebuilds the steps of each crop. No torch:
the rule runs in the light I/O environment.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from stepseg import checks, nifti, presets, qc
from stepseg.errors import StudyError
from stepseg.settings import TargetsSettings
from stepseg.stepmap import step_map

log = logging.getLogger(__name__)


def write_study_targets(
    study: str,
    seg_path: str | Path,
    suv_path: str | Path,
    ctres_path: str | Path,
    steps_path: str | Path,
    qc_path: str | Path,
    settings: TargetsSettings,
) -> None:
    """Check one study's inputs, write its step map (uint8 NIfTI, stored like the SUV file) and
    a QC figure."""
    preset = presets.preset_from_settings(settings)
    seg = nifti.load(seg_path, study)
    suv = nifti.load(suv_path, study, dtype=np.float32)
    ctres = nifti.load(ctres_path, study)
    nifti.check_same_grid(
        study,
        {
            "SEG": (Path(seg_path), seg),
            "SUV": (Path(suv_path), suv),
            "CTres": (Path(ctres_path), ctres),
        },
    )
    checks.check_suv(study, suv.array, suv_path)
    mask = check_binary_mask(study, seg.array, seg_path)
    steps = step_map(mask, preset.voxel_steps(seg.spacing_zyx))
    log.info(
        "study %s: %d lesion voxels, preset %s, steps %s",
        study,
        int(mask.sum()),
        preset.name,
        {int(v): int(n) for v, n in zip(*np.unique(steps, return_counts=True), strict=True)},
    )
    # on the SUV file's voxels, in its orientation and affine (arrays are canonical here)
    nifti.save(replace(suv, array=steps), steps_path, dtype=np.uint8)
    qc.write_step_contours(study, suv.array, steps, suv.spacing_zyx, preset, qc_path)


def check_binary_mask(study: str, seg: np.ndarray, path: str | Path) -> np.ndarray:
    """The lesion mask of a SEG volume; labels other than 0/1 mean a conversion went wrong."""
    values = np.unique(seg)
    if not np.isin(values, (0, 1)).all():
        raise StudyError(study, f"SEG is not binary: values {values[:10].tolist()}", path)
    return seg.astype(bool)
