"""Reference: the SEG step of the official autoPET DICOM -> NIfTI conversion, restated.

Source: https://github.com/lab-midas/autoPET/blob/468179b78ccbefde251bee0a152d9194fc64d5d3/data_conversion/tcia2nifti.py
(function dcm2nii_mask); MIT License, Copyright (c) 2022 midas.lab.

A re-typed restatement, not a copy (this project keeps third-party source text out of its
commits). The script reads the SEG's pixel data with pydicom, (frames, rows, columns), transposes
it to (columns, rows, frames), flips the rows when the shared functional groups'
ImageOrientationPatient[4] is 1, and saves it with the affine of the PET that dicom2nifti wrote
with reorient=True, i.e. in LAS: x right to left, y posterior to anterior, z inferior to
superior. It never reads a frame's position or referenced PET slice, so it is right only for a
SEG with one frame per PET slice, ordered from the feet to the head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

# the orientation of dicom2nifti's reoriented PET, whose affine the script gives the mask
ORIENTATION = ("L", "A", "S")


def dcm2nii_mask(seg_path: str | Path) -> np.ndarray:
    """The mask array the script saves, (x, y, z) in `ORIENTATION`."""
    mask = pydicom.dcmread(str(seg_path))
    mask_array = np.transpose(mask.pixel_array, (2, 1, 0))
    orientation = mask.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    if orientation.ImageOrientationPatient[4] == 1:
        mask_array = np.flip(mask_array, 1)
    return mask_array
