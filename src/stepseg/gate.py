"""The lesion-presence gate: the paper's proposal (section 2.2) that the output channel expanded
to the whole image "can also be used to judge whether there are lesions in the input image".

A step-by-step model's whole-crop channel is trained to hold its fill (normalised CT or PET)
everywhere in a crop with a lesion voxel and zero in a crop without (`stepseg.channels`), so per
sliding window the least-squares factor of its output on the fill, sum(out * fill) /
sum(fill^2), says how sure the network is that the window holds a lesion (about 1: yes, about 0:
no). Inference blends those window factors like the probabilities (`infer.window_presence`),
each predicted component gets the mean blended factor over its voxels (`component_presence`, the
map `infer` writes beside the mask), and the gate drops the components below a threshold
(`apply`).

The threshold is chosen on out-of-fold studies only (`choose_threshold`): the one with the lowest
mean FPV among those that keep the mean Dice of the lesion studies at least where it is without
the gate (the lowest of equal ones): the gate may only remove false positives, at no cost in the
challenge's first metric. Scores that trade Dice against lesion-free studies chose to drop every
component on the default run's out-of-fold studies: minimising FPV + FNV (an empty prediction's
FNV, about the mean lesion volume, was below the models' FPV) and the mean study score with 1 for
an empty lesion-free study (16 of its 31 studies are lesion-free). Out-of-fold studies of fold f
are gated with the threshold chosen on the other folds (`cross_fitted_thresholds`), so that their
gated metrics are as unseen as the ungated ones; test studies with the one chosen on every
out-of-fold study.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stepseg import metrics, nifti
from stepseg.atomic import atomic_file
from stepseg.errors import StudyError
from stepseg.presets import Preset

# components are lesions as the official metrics define them
CONNECTIVITY = metrics.OFFICIAL_CONNECTIVITY
GATE_FORMAT = "stepseg-gate-1"


def presence_path(mask_path: str | Path) -> Path:
    """The presence map beside a mask: `<name>.presence<suffixes>` (`X.nii.gz` ->
    `X.presence.nii.gz`, `X.mha` -> `X.presence.mha`)."""
    path = Path(mask_path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(path.name[: -len(suffix)] + ".presence" + suffix)


def whole_crop_channel(preset: Preset) -> tuple[int, str] | None:
    """(index, fill) of the trained output channel that covers the whole crop (one, PET or CT
    fill, with a loss); None without one."""
    if not preset.steps or not preset.steps[-1].whole:
        return None
    whole_step = len(preset.steps)  # step k covers dilation k (0: the lesion itself)
    for index, channel in enumerate(preset.channels):
        if channel.step == whole_step and channel.loss != "none" and channel.fill != "ct_window":
            return index, channel.fill
    return None


def component_presence(mask: np.ndarray, presence: np.ndarray) -> np.ndarray:
    """float32 map (z, y, x): each component of `mask` holds the mean of `presence` over its
    voxels, the background 0."""
    out = np.zeros(mask.shape, np.float32)
    foreground = np.asarray(mask) != 0
    if not foreground.any():
        return out
    box = metrics.foreground_box(foreground)
    labels, count = metrics.components(foreground[box], CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sums = np.bincount(labels.ravel(), weights=presence[box].ravel(), minlength=count + 1)
    means = (sums / np.maximum(sizes, 1)).astype(np.float32)
    means[0] = 0.0
    out[box] = means[labels]
    return out


def apply(mask: np.ndarray, component_map: np.ndarray, threshold: float) -> np.ndarray:
    """`mask` without the components whose presence is below `threshold` (uint8)."""
    return ((np.asarray(mask) != 0) & (component_map >= threshold)).astype(np.uint8)


@dataclass(frozen=True)
class StudyCurve:
    """One study's autoPET metrics at every gate threshold: `levels` are its components'
    distinct presence values, ascending; `at[j]` the metrics with every component below
    `levels[j]` dropped (`at[len(levels)]`: all dropped)."""

    study: str
    has_lesions: bool
    levels: np.ndarray
    at: tuple[Mapping[str, float], ...]

    def metrics(self, threshold: float) -> Mapping[str, float]:
        return self.at[int(np.searchsorted(self.levels, threshold, side="left"))]


def study_curve(
    study: str, seg: np.ndarray, mask: np.ndarray, component_map: np.ndarray, voxel_ml: float
) -> StudyCurve:
    """`StudyCurve` of one study, each point computed with `metrics.study_metrics`."""
    foreground = np.asarray(mask) != 0
    levels = np.unique(component_map[foreground])
    at = [
        metrics.study_metrics(seg, apply(mask, component_map, level), voxel_ml) for level in levels
    ]
    at.append(metrics.study_metrics(seg, np.zeros_like(foreground), voxel_ml))
    has_lesions = bool(np.asarray(seg).any())
    return StudyCurve(study, has_lesions, levels, tuple(at))


def candidates(curves: Sequence[StudyCurve]) -> list[float]:
    """Every distinct gate: -inf (nothing dropped), the midpoint between each two neighbouring
    presence levels of the studies' components, and +inf (everything dropped)."""
    levels = sorted({float(v) for curve in curves for v in curve.levels})
    midpoints = [(low + high) / 2 for low, high in itertools.pairwise(levels)]
    return [-math.inf, *midpoints, math.inf]


OBJECTIVE = "the lowest mean FPV at a mean lesion-study Dice no lower than without the gate"


def objective(curves: Sequence[StudyCurve], threshold: float) -> dict[str, float]:
    """At `threshold`: mean FPV (every study), mean FNV and Dice (lesion studies) and the share
    of lesion-free studies predicted empty."""
    points = [curve.metrics(threshold) for curve in curves]
    lesion = [p for p, c in zip(points, curves, strict=True) if c.has_lesions]
    free = [p for p, c in zip(points, curves, strict=True) if not c.has_lesions]
    return {
        "threshold": threshold,
        "fpv_ml": float(np.mean([p["fpv_ml"] for p in points])),
        "fnv_ml": float(np.mean([p["fnv_ml"] for p in lesion])) if lesion else math.nan,
        "dice": float(np.mean([p["dice"] for p in lesion])) if lesion else math.nan,
        "lesion_free_empty": (
            float(np.mean([p["mtv_pred_ml"] == 0 for p in free])) if free else math.nan
        ),
    }


def choose_threshold(curves: Sequence[StudyCurve]) -> tuple[float, list[dict[str, float]]]:
    """The threshold of `OBJECTIVE` on `curves` (-inf: the gate changes nothing) and the whole
    curve. Without lesion studies, Dice constrains nothing."""
    if not curves:
        raise ValueError("no studies to choose a gate threshold on")
    curve = [objective(curves, t) for t in candidates(curves)]
    ungated = curve[0]["dice"]
    allowed = [p for p in curve if math.isnan(ungated) or p["dice"] >= ungated - 1e-12]
    best = min(allowed, key=lambda point: (point["fpv_ml"], point["threshold"]))
    return best["threshold"], curve


def cross_fitted_thresholds(
    curves: Sequence[StudyCurve], groups: Sequence[int]
) -> dict[int, float]:
    """{group: the threshold chosen on the other groups' studies}; with one group its own
    (in-sample: there is nothing else to choose on)."""
    distinct = sorted(set(groups))
    chosen = {}
    for group in distinct:
        others = [
            c for c, g in zip(curves, groups, strict=True) if g != group or len(distinct) == 1
        ]
        chosen[group], _ = choose_threshold(others)
    return chosen


def write_choice(
    path: str | Path,
    *,
    threshold: float,
    per_group: Mapping[int, float],
    curve: Sequence[Mapping[str, float]],
    selection: str,
) -> None:
    """The gate's record: the test threshold, each fold's cross-fitted one and the curve."""
    record = {
        "format": GATE_FORMAT,
        "selection_split": selection,
        "objective": OBJECTIVE,
        "threshold": threshold,
        "fold_thresholds": {str(group): value for group, value in per_group.items()},
        "curve": list(curve),
    }
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1) + "\n")


def read_choice(path: str | Path) -> dict[str, Any]:
    """A record of `write_choice`, refused when it is anything else."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"gate record {path}: cannot read it ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != GATE_FORMAT:
        raise ValueError(f"gate record {path} is not a {GATE_FORMAT} file")
    return record


def gate_predictions(
    *,
    selection: Mapping[str, Sequence[tuple[str, Path, Path, int]]],
    test: Sequence[tuple[str, Path]],
    out_dir: str | Path,
    record_path: str | Path,
) -> float:
    """The gate job of one trained variant: choose the threshold on the selection split's
    studies and write the gated masks of both splits.

    `selection` maps the selection split's name ("oof" or "val") to its studies as (study,
    prediction, SEG, fold); `test` lists (study, prediction). Writes
    `out_dir/<split>/<study>.nii.gz` (a selection study gated with the threshold chosen without
    its fold, `cross_fitted_thresholds`; a test study with the one chosen on every selection
    study) and the record (`write_choice`). Returns the test threshold.
    """
    ((split, studies),) = selection.items()
    curves = []
    for study, prediction, seg_path, _ in studies:
        mask, presence = _read_prediction(study, prediction)
        seg = nifti.load(seg_path, study, dtype=np.uint8)
        voxel_ml = metrics.header_voxel_ml(seg_path, study)
        curves.append(study_curve(study, seg.array, mask.array, presence, voxel_ml))
    per_group = cross_fitted_thresholds(curves, [fold for *_, fold in studies])
    threshold, curve = choose_threshold(curves)
    # read again rather than held: a split of the collection's studies does not fit in memory
    for study, prediction, _, fold in studies:
        _write_gated(study, prediction, per_group[fold], Path(out_dir) / split)
    for study, prediction in test:
        _write_gated(study, prediction, threshold, Path(out_dir) / "test")
    write_choice(
        record_path, threshold=threshold, per_group=per_group, curve=curve, selection=split
    )
    return threshold


def _write_gated(study: str, prediction: Path, threshold: float, folder: Path) -> None:
    """`folder/<study>.nii.gz`: the prediction without its components below `threshold`."""
    mask, presence = _read_prediction(study, prediction)
    folder.mkdir(parents=True, exist_ok=True)
    nifti.save(
        replace(mask, array=apply(mask.array, presence, threshold)), folder / f"{study}.nii.gz"
    )


def _read_prediction(study: str, prediction: Path) -> tuple[nifti.Volume, np.ndarray]:
    """A mask and its presence map (`presence_path`), refused when the map is missing."""
    presence_file = presence_path(prediction)
    if not presence_file.is_file():
        raise StudyError(
            study,
            "no lesion-presence map beside the prediction: its model has no trained whole-crop "
            "channel (set gate.enabled: false, or targets with a `whole` last step)",
            presence_file,
        )
    mask = nifti.load(prediction, study, dtype=np.uint8)
    presence = nifti.load(presence_file, study, dtype=np.float32)
    if presence.array.shape != mask.array.shape:
        raise StudyError(study, f"presence map {presence.array.shape} and mask "
                         f"{mask.array.shape} differ in shape", presence_file)  # fmt: skip
    return mask, presence.array
