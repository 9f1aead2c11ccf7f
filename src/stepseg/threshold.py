"""The untrained baseline: a classical SUV threshold, the floor every trained variant must beat.

Voxels with SUV >= `suv` form candidate lesions (18-connected components, as in the autoPET
metrics); optionally each component keeps only voxels >= `relative_to_max` x its own SUVmax (the
clinical 41 % SUVmax rule, 0 = off), and components below `min_volume_ml` are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import cc3d
import numpy as np
from scipy import ndimage

from stepseg import nifti
from stepseg.settings import ThresholdSettings

log = logging.getLogger(__name__)

CONNECTIVITY = 18


def threshold_mask(suv: nifti.Volume, settings: ThresholdSettings) -> np.ndarray:
    """Binary (z, y, x) uint8 mask of the SUV-threshold baseline."""
    mask = suv.array >= settings.suv
    labels = cc3d.connected_components(mask, connectivity=CONNECTIVITY)
    n = int(labels.max())
    if n == 0:
        return mask.astype(np.uint8)
    index = np.arange(1, n + 1)
    if settings.relative_to_max > 0:
        suv_max = np.asarray(ndimage.maximum(suv.array, labels, index))
        cut = np.concatenate([[np.inf], settings.relative_to_max * suv_max])
        mask &= suv.array >= cut[labels]
    min_voxels = settings.min_volume_ml / suv.voxel_ml
    if min_voxels > 0:
        counts = np.bincount(labels[mask], minlength=n + 1)
        mask &= counts[labels] >= min_voxels
    return mask.astype(np.uint8)


def predict_file(
    *, study: str, suv_path: str | Path, out_path: str | Path, settings: ThresholdSettings
) -> None:
    """Threshold one study's SUV.nii.gz; the mask is stored like the SUV file (orientation and
    affine)."""
    suv = nifti.load(suv_path, study, np.float32)
    mask = threshold_mask(suv, settings)
    nifti.save(replace(suv, array=mask), out_path, dtype=np.uint8)
    log.info("%s: %.2f ml above the SUV threshold", study, float(mask.sum()) * suv.voxel_ml)
