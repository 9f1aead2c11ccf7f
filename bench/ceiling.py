"""How far a cohort's Dice target is from what its images allow: an oracle-localised ceiling.

For every study with lesions in a finished run (results/manifest.tsv, results/nifti/), each true
lesion component is given to an oracle that knows where it is: inside the component dilated by
`--margin` voxels (other lesions excluded) it picks the SUV threshold with the best Dice for that
lesion. The study's Dice over all its oracle masks is what a perfect detector that delineates by
the best per-lesion SUV threshold reaches: lesions fainter than their surroundings, lesions
touching hot organs and the blurred rims of small ones cap it below 1. The clinical 41 %-of-SUVmax
rule under the same oracle is printed beside it, and the trained variants' test Dice (from
results/metrics, when present) below, so the gap to the ceiling is explicit.

    .venv/bin/python bench/ceiling.py [--results results] [--margin 3]

Without a finished run (no `<results>/manifest.tsv`: a fresh clone before `make run`) it says so
and exits with status 77, which `make bench` counts as skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cc3d
import numpy as np
import pandas as pd
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stepseg import manifest, names, nifti  # noqa: E402

SKIPPED = 77  # the exit status `make bench` reads as "cannot run here", after the reason
THRESHOLD_QUANTILES = np.linspace(0.01, 0.99, 99)
RELATIVE_TO_MAX = 0.41


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * float((pred & truth).sum()) / float(pred.sum() + truth.sum())


def oracle_masks(suv: np.ndarray, seg: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """(best-threshold mask, 41 %-of-SUVmax mask), each lesion delineated in its own region."""
    labels = cc3d.connected_components(seg.astype(np.uint8), connectivity=18)
    best_mask = np.zeros(seg.shape, dtype=bool)
    relative_mask = np.zeros(seg.shape, dtype=bool)
    for label in range(1, int(labels.max()) + 1):
        lesion = labels == label
        region = ndimage.binary_dilation(lesion, iterations=margin) & ~(seg & ~lesion)
        values, truth = suv[region], lesion[region]
        thresholds = np.quantile(values, THRESHOLD_QUANTILES)
        scores = [dice(values >= t, truth) for t in thresholds]
        best_mask[region] |= values >= thresholds[int(np.argmax(scores))]
        relative_mask[region] |= values >= RELATIVE_TO_MAX * float(suv[lesion].max())
    return best_mask, relative_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--margin", type=int, default=3, help="voxels around each lesion")
    args = parser.parse_args()
    if not (args.results / "manifest.tsv").is_file():
        print(
            f"skipped: needs a finished run, and {args.results / 'manifest.tsv'} is missing "
            "(`make run` makes one; --results names another)",
            file=sys.stderr,
        )
        sys.exit(SKIPPED)

    table = manifest.read(args.results / "manifest.tsv")
    rows = []
    for study, split in zip(table["study_id"], table["split"], strict=True):
        folder = args.results / "nifti" / study
        seg = nifti.load(folder / "SEG.nii.gz", study).array > 0
        if not seg.any():
            continue
        suv = nifti.load(folder / "SUV.nii.gz", study, np.float32).array
        best, relative = oracle_masks(suv, seg, args.margin)
        rows.append(
            {"split": split, "study": study, "best": dice(best, seg), "41%": dice(relative, seg)}
        )
    frame = pd.DataFrame(rows)
    print(f"oracle-localised Dice ceiling (lesion studies, margin {args.margin} voxels)")
    print(f"{'split':<8}{'studies':>8}{'best threshold':>16}{'41% SUVmax':>12}")
    for split, part in frame.groupby("split", sort=False):
        print(f"{split:<8}{len(part):>8}{part['best'].mean():>16.3f}{part['41%'].mean():>12.3f}")
    for split in names.EVAL_SPLITS:  # oof or val, and test
        summaries = sorted((args.results / "metrics").glob(f"*/{split}_summary.csv"))
        if summaries:
            print(f"\n{split} split, trained and threshold variants (results/metrics)")
        for path in summaries:
            summary = pd.read_csv(path)
            print(f"{path.parent.name:<20}Dice {float(summary['dice'].iloc[0]):.3f}")


if __name__ == "__main__":
    main()
