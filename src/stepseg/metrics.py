"""autoPET evaluation: Dice, false positive volume and false negative volume, exactly as the
official challenge scripts define them, plus lesion-wise detection and clinical quantities.

Official definitions (lab-midas/autoPET `val_script.py`, 2022, and the autoPET III evaluation):
connected components with 18-connectivity (cc3d); FPV = volume of predicted components that touch
no ground-truth voxel; FNV = volume of ground-truth components that touch no predicted voxel;
Dice = 2|P n G| / (|P| + |G|) with no smoothing term; the voxel volume in ml is the product of the
header's pixdim[1:4] / 1000. A study without lesions has undefined (NaN) Dice and FNV and
contributes only its FPV; aggregates are means over the defined values.

The official script loops over components and builds one full-volume `np.isin` mask per
component (O(components x voxels)). Here each mask is labelled once by cc3d and the overlap is
counted for all components at once with `np.bincount`, inside the bounding box of P u G.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import cc3d
import numpy as np
import pandas as pd

from stepseg import nifti
from stepseg.atomic import atomic_file
from stepseg.errors import StudyError
from stepseg.settings import EvaluateSettings

log = logging.getLogger(__name__)

OFFICIAL_CONNECTIVITY = 18
CONNECTIVITIES = (6, 18, 26)

PER_STUDY_COLUMNS = [
    "study",
    "has_lesions",
    "dice",
    "fpv_ml",
    "fnv_ml",
    "tp_lesions",
    "fp_lesions",
    "fn_lesions",
    "mtv_true_ml",
    "mtv_pred_ml",
    "tlg_true",
    "tlg_pred",
    "suvmax_true",
    "suvmax_pred",
]
# Per-study values that are averaged into the summary (NaN = undefined, left out of the mean).
METRIC_COLUMNS = PER_STUDY_COLUMNS[2:]


def header_voxel_ml(path: str | Path, study: str) -> float:
    """Voxel volume in ml from the NIfTI header's pixdim, the quantity the official script uses."""
    zooms = nifti.header(path, study)["pixdim"][1:4].astype(np.float64)
    return float(np.prod(zooms)) / 1000.0


def _as_mask(array: np.ndarray, name: str) -> np.ndarray:
    """A boolean view of a 0/1 array; anything else (labels 2+, probabilities) is refused."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.integer):
        binary = array.size == 0 or (array.min() >= 0 and array.max() <= 1)
    else:
        binary = np.array_equal(array, array != 0)
    if not binary:
        values = np.unique(array[(array != 0) & (array != 1)])[:5]
        raise ValueError(f"{name} is not binary (0/1): found values such as {values.tolist()}")
    if array.dtype.itemsize == 1 and np.issubdtype(array.dtype, np.integer):
        return array.view(np.bool_)
    return array != 0


def foreground_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel (labelling only this box gives the same
    components: a component never leaves the foreground)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0))
    return tuple(box)


def components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    contiguous = np.ascontiguousarray(mask).view(np.uint8)
    labels, count = cc3d.connected_components(contiguous, connectivity=connectivity, return_N=True)
    return labels, int(count)


def overlap_counts(
    gt: np.ndarray, pred: np.ndarray, connectivity: int = OFFICIAL_CONNECTIVITY
) -> dict[str, int]:
    """Voxel and component counts behind the autoPET metrics (all integers, no volumes).

    fp_voxels/fn_voxels are the official false positive/negative pixel counts; tp_lesions and
    fn_lesions count ground-truth components touched/untouched by the prediction, fp_lesions the
    predicted components touching no ground truth.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    gt = _as_mask(gt, "ground truth")
    pred = _as_mask(pred, "prediction")
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape}: not one 3-D grid")
    box = foreground_box(gt | pred)
    gt, pred = gt[box], pred[box]
    both = gt & pred

    pred_labels, n_pred = components(pred, connectivity)
    pred_sizes = np.bincount(pred_labels[pred], minlength=n_pred + 1)
    pred_hit = np.bincount(pred_labels[both], minlength=n_pred + 1) > 0
    gt_labels, n_gt = components(gt, connectivity)
    gt_sizes = np.bincount(gt_labels[gt], minlength=n_gt + 1)
    gt_hit = np.bincount(gt_labels[both], minlength=n_gt + 1) > 0

    fp_components = ~pred_hit[1:]
    fn_components = ~gt_hit[1:]
    return {
        "gt_voxels": int(gt_sizes.sum()),
        "pred_voxels": int(pred_sizes.sum()),
        "overlap_voxels": int(both.sum()),
        "fp_voxels": int(pred_sizes[1:][fp_components].sum()),
        "fn_voxels": int(gt_sizes[1:][fn_components].sum()),
        "tp_lesions": int(n_gt - fn_components.sum()),
        "fn_lesions": int(fn_components.sum()),
        "fp_lesions": int(fp_components.sum()),
    }


def study_metrics(
    gt: np.ndarray,
    pred: np.ndarray,
    voxel_ml: float,
    suv: np.ndarray | None = None,
    connectivity: int = OFFICIAL_CONNECTIVITY,
) -> dict[str, float | int | bool]:
    """autoPET metrics of one study from (z, y, x) 0/1 masks; NaN where a value is undefined.

    Dice and FNV are NaN without lesions (autoPET III); FPV is 0 for an empty prediction. With
    `suv`, adds metabolic tumour volume (ml), total lesion glycolysis (SUVmean x MTV = sum of SUV x
    voxel volume) and SUVmax of the true and the predicted lesions.
    """
    gt = _as_mask(gt, "ground truth")
    pred = _as_mask(pred, "prediction")
    counts = overlap_counts(gt, pred, connectivity)
    has_lesions = counts["gt_voxels"] > 0
    nan = math.nan
    result: dict[str, float | int | bool] = {
        "has_lesions": has_lesions,
        "dice": (
            2 * counts["overlap_voxels"] / (counts["gt_voxels"] + counts["pred_voxels"])
            if has_lesions
            else nan
        ),
        "fpv_ml": counts["fp_voxels"] * voxel_ml,
        "fnv_ml": counts["fn_voxels"] * voxel_ml if has_lesions else nan,
        "tp_lesions": counts["tp_lesions"],
        "fp_lesions": counts["fp_lesions"],
        "fn_lesions": counts["fn_lesions"],
        "mtv_true_ml": counts["gt_voxels"] * voxel_ml,
        "mtv_pred_ml": counts["pred_voxels"] * voxel_ml,
        "tlg_true": nan,
        "tlg_pred": nan,
        "suvmax_true": nan,
        "suvmax_pred": nan,
    }
    if suv is not None:
        suv = np.asarray(suv)
        if suv.shape != gt.shape:
            raise ValueError(f"SUV {suv.shape} and ground truth {gt.shape} differ in shape")
        for kind, mask in (("true", gt), ("pred", pred)):
            values = suv[mask].astype(np.float64)
            result[f"tlg_{kind}"] = float(values.sum()) * voxel_ml
            result[f"suvmax_{kind}"] = float(values.max()) if values.size else nan
    return result


def summarise(per_study: pd.DataFrame) -> dict[str, float | int]:
    """Mean of each defined per-study value (NaN left out), with the study counts."""
    summary: dict[str, float | int] = {
        "n_studies": len(per_study),
        "n_lesion_studies": int(per_study["has_lesions"].astype(bool).sum()),
    }
    for column in METRIC_COLUMNS:
        values = pd.to_numeric(per_study[column], errors="raise").dropna()
        summary[column] = float(values.mean()) if len(values) else math.nan
    # the false positives a lesion/no-lesion decision could remove: in studies without lesions
    lesion_free = per_study.loc[~per_study["has_lesions"].astype(bool), "fpv_ml"]
    summary["fpv_lesion_free_ml"] = (
        float(pd.to_numeric(lesion_free).mean()) if len(lesion_free) else math.nan
    )
    return summary


def evaluate_study(
    study: str,
    seg_path: str | Path,
    suv_path: str | Path,
    pred_path: str | Path,
    connectivity: int = OFFICIAL_CONNECTIVITY,
) -> dict[str, float | int | bool | str]:
    """Metrics of one study from its files; refuses a prediction off the SEG grid."""
    pred_path = Path(pred_path)
    if not pred_path.is_file():
        raise StudyError(study, "prediction is missing for a study of this split", pred_path)
    seg = nifti.load(seg_path, study)
    suv = nifti.load(suv_path, study)
    pred = nifti.load(pred_path, study)
    nifti.check_same_grid(
        study,
        {
            "SEG": (Path(seg_path), seg),
            "SUV": (Path(suv_path), suv),
            "prediction": (pred_path, pred),
        },
    )
    masks = {}
    for name, path, volume in (("SEG", seg_path, seg), ("prediction", pred_path, pred)):
        try:
            masks[name] = _as_mask(volume.array, name)
        except ValueError as exc:
            raise StudyError(study, str(exc), path) from exc
    metrics = study_metrics(
        masks["SEG"], masks["prediction"], header_voxel_ml(seg_path, study), suv.array, connectivity
    )
    return {"study": study, **metrics}


def evaluate_split(
    *,
    studies: Sequence[str],
    seg_paths: Sequence[str | Path],
    suv_paths: Sequence[str | Path],
    pred_paths: Sequence[str | Path],
    per_study_csv: str | Path,
    summary_csv: str | Path,
    settings: EvaluateSettings,
) -> pd.DataFrame:
    """Evaluate one variant on one split: per-study CSV and a one-row summary CSV.

    The path lists are aligned with `studies`. Returns the per-study table.
    """
    lengths = {len(studies), len(seg_paths), len(suv_paths), len(pred_paths)}
    if len(lengths) != 1:
        raise ValueError(
            f"studies ({len(studies)}), SEG ({len(seg_paths)}), SUV ({len(suv_paths)}) and "
            f"prediction ({len(pred_paths)}) lists must be aligned"
        )
    if not studies:
        raise ValueError("the split has no studies to evaluate")
    connectivity = settings.connectivity
    if connectivity != OFFICIAL_CONNECTIVITY:
        log.warning("connectivity %d differs from the official autoPET 18", connectivity)
    rows = []
    for study, seg, suv, pred in zip(studies, seg_paths, suv_paths, pred_paths, strict=True):
        rows.append(evaluate_study(study, seg, suv, pred, connectivity))
        log.info(
            "%s: dice %.4f, FPV %.3f ml, FNV %.3f ml",
            study,
            rows[-1]["dice"],
            rows[-1]["fpv_ml"],
            rows[-1]["fnv_ml"],
        )
    per_study = pd.DataFrame(rows, columns=PER_STUDY_COLUMNS)
    summary = pd.DataFrame([summarise(per_study)])
    with atomic_file(per_study_csv) as tmp:
        per_study.to_csv(tmp, index=False)
    with atomic_file(summary_csv) as tmp:
        summary.to_csv(tmp, index=False)
    return per_study
