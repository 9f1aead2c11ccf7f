"""Detection and false negative volume by lesion size, from a finished run's predictions.

    python tools/lesion_sizes.py results stepwise-seed0 stepwise_component-seed0 ...

Every ground-truth lesion (18-connected component, as the official metrics count them) of every
evaluated study (out of fold or val, and test) is binned by volume; per variant and bin: lesions,
the share touched by the prediction, and the missed volume (the bin's part of FNV) per lesion
study. For levers aimed at small lesions (`train.lesion_centres`), which the study means of
the report dilute. Paired: every variant is read on the same lesions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from stepseg import manifest, metrics, names, nifti

BINS_ML = (0.0, 2.0, 8.0, np.inf)


def prediction_paths(results: Path, variant: str) -> dict[str, Path]:
    """{study: its mask} of a variant, wherever its jobs wrote it (chunk folders or not)."""
    found = {}
    for path in (results / "predictions" / variant).rglob("*.nii.gz"):
        if not path.name.endswith(".presence.nii.gz"):
            found[path.name[: -len(".nii.gz")]] = path
    return found


def lesion_table(results: Path, variants: list[str]) -> pd.DataFrame:
    """One row per (variant, lesion): study, volume (ml), detected."""
    table = manifest.read(results / "manifest.tsv")
    lesion_studies = sorted(table.loc[table["has_lesions"].astype(str) == "True", "study_id"])
    predictions = {variant: prediction_paths(results, variant) for variant in variants}
    rows = []
    for study in lesion_studies:
        if not all(study in found for found in predictions.values()):
            continue  # not evaluated (a training study without cross-validation)
        seg_path = results / "nifti" / study / "SEG.nii.gz"
        seg = nifti.load(seg_path, study).array > 0
        voxel_ml = metrics.header_voxel_ml(seg_path, study)
        labels, count = metrics.components(seg, metrics.OFFICIAL_CONNECTIVITY)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        for variant, found in predictions.items():
            pred = nifti.load(found[study], study).array > 0
            touched = np.bincount(labels[pred], minlength=count + 1) > 0
            for k in range(1, count + 1):
                rows.append({"variant": variant, "study": study, "volume_ml": sizes[k] * voxel_ml,
                             "detected": bool(touched[k])})  # fmt: skip
    return pd.DataFrame(rows)


def by_size(lesions: pd.DataFrame) -> pd.DataFrame:
    """Per variant and volume bin: lesions, detected share, missed ml per lesion study."""
    studies = lesions["study"].nunique()
    lesions = lesions.assign(
        bin=pd.cut(lesions["volume_ml"], BINS_ML, right=False),
        missed_ml=lesions["volume_ml"].where(~lesions["detected"], 0.0),
    )
    grouped = lesions.groupby(["variant", "bin"], observed=True, sort=False)
    return (
        pd.DataFrame(
            {
                "lesions": grouped.size(),
                "detected": grouped["detected"].mean().round(3),
                "missed_ml_per_study": (grouped["missed_ml"].sum() / studies).round(3),
            }
        )
        .reset_index()
        .sort_values("bin", kind="stable", ignore_index=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a finished run's results/ folder")
    parser.add_argument("variants", nargs="+", help=f"e.g. {names.trained_name('stepwise', 0)}")
    args = parser.parse_args(argv)
    lesions = lesion_table(args.results, args.variants)
    print(f"{lesions['study'].nunique()} lesion studies, "
          f"{len(lesions) // len(args.variants)} lesions")  # fmt: skip
    print(by_size(lesions).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
