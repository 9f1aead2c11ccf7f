"""Reference: the official autoPET metric definitions, restated for comparison tests.

Sources (the algorithms below follow these files step by step):
- autoPET 2022: https://github.com/lab-midas/autoPET/blob/8da2f7ed14fed5cdf0a63b7f1f4f7824d343864d/val_script.py
  (functions nii2numpy, con_comp, false_pos_pix, false_neg_pix, dice_score, compute_metrics);
  MIT License, Copyright (c) 2022 midas.lab.
- autoPET III: https://github.com/ClinicalDataScience/autoPETIII/blob/3d3f142d2e31b50364019abd786172915e6aae83/evaluation-metrics/evaluation_metrics.py
  (count_false_positives, count_false_negatives, calc_dice_score); Apache License 2.0,
  Copyright 2024 Clinical Data Science, Department of Radiology, LMU University Hospital.

This is a re-typed restatement rather than a verbatim copy (this project keeps third-party source
text out of its commits), kept deliberately naive so that it stays easy to check against the
sources line by line: the voxel volume is the product of header pixdim[1..3] / 1000 computed in the
header's own float32 arithmetic, volumes are read with get_fdata() (float64, NIfTI x, y, z order),
components are labelled by cc3d with connectivity 18, and every component is tested with one
full-volume np.isin mask. Changes: names and comments only, and the autoPET III compute_metrics
reads its own arguments (the source reads module-level names there by mistake).
"""

from __future__ import annotations

import cc3d
import nibabel as nib
import numpy as np

CONNECTIVITY = 18


def nii2numpy(path):
    """Volume as float64 (x, y, z) and voxel volume in ml from pixdim (float32 arithmetic)."""
    image = nib.load(str(path))
    pixdim = image.header["pixdim"]
    return image.get_fdata(), pixdim[1] * pixdim[2] * pixdim[3] / 1000


def con_comp(mask):
    return cc3d.connected_components(mask, connectivity=CONNECTIVITY)


def false_pos_pix(gt, pred):
    """2022: voxels of predicted components that share no voxel with the ground truth."""
    labels = con_comp(pred)
    total = 0
    for idx in range(1, labels.max() + 1):
        component = np.isin(labels, idx)
        if (component * gt).sum() == 0:
            total = total + component.sum()
    return total


def false_neg_pix(gt, pred):
    """2022: voxels of ground-truth components that share no voxel with the prediction."""
    labels = con_comp(gt)
    total = 0
    for idx in range(1, labels.max() + 1):
        component = np.isin(labels, idx)
        if (component * pred).sum() == 0:
            total = total + component.sum()
    return total


def dice_score(mask1, mask2):
    """2022: 2 |A n B| / (|A| + |B|), no smoothing (0/0 gives NaN with a warning)."""
    overlap = (mask1 * mask2).sum()
    total = mask1.sum() + mask2.sum()
    return 2 * overlap / total


def count_false_positives(*, prediction, ground_truth):
    """autoPET III: as false_pos_pix on an int copy; 0 for an empty prediction."""
    if prediction.sum() == 0:
        return 0
    labels = cc3d.connected_components(prediction.astype(int), connectivity=CONNECTIVITY)
    total = 0
    for idx in range(1, labels.max() + 1):
        component = np.isin(labels, idx)
        if (component * ground_truth).sum() == 0:
            total += component.sum()
    return float(total)


def count_false_negatives(*, prediction, ground_truth):
    """autoPET III: as false_neg_pix on an int copy; NaN without lesions."""
    if ground_truth.sum() == 0:
        return np.nan
    labels = cc3d.connected_components(ground_truth.astype(int), connectivity=CONNECTIVITY)
    total = 0
    for idx in range(1, labels.max() + 1):
        component = np.isin(labels, idx)
        if (component * prediction).sum() == 0:
            total += component.sum()
    return float(total)


def calc_dice_score(*, prediction, ground_truth):
    """autoPET III: Dice, NaN without lesions."""
    if ground_truth.sum() == 0:
        return np.nan
    intersection = (ground_truth * prediction).sum()
    union = ground_truth.sum() + prediction.sum()
    return float(2 * intersection / union)


def compute_metrics(gt_path, pred_path):
    """autoPET III compute_metrics: (dice, FPV ml, FNV ml), voxel volume of the ground truth."""
    gt, voxel_vol = nii2numpy(gt_path)
    pred, _ = nii2numpy(pred_path)
    fnv = count_false_negatives(prediction=pred, ground_truth=gt) * voxel_vol
    fpv = count_false_positives(prediction=pred, ground_truth=gt) * voxel_vol
    return calc_dice_score(prediction=pred, ground_truth=gt), fpv, fnv
