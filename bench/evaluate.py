"""Seconds per whole-body study for the autoPET metrics (FPV, FNV, Dice counts).

Compares, in one run and on the same synthetic masks at the real autoPET geometry:
- ours: `stepseg.metrics.overlap_counts` (cc3d once per mask, bincount overlap, bounding box);
- scipy: a straightforward vectorised reimplementation with scipy.ndimage.label and the
  18-connectivity structure (the baseline of the ratios);
- official: the challenge script's loop of one full-volume np.isin mask per component
  (tests/reference/autopet_official.py), skipped with --skip-official.
All three must give the same counts; the run stops otherwise.

    .venv/bin/python bench/evaluate.py                       # 400x400x326, 3 studies
    .venv/bin/python bench/evaluate.py --shape 96 128 128 --studies 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from stepseg import metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import autopet_official as official


def synthetic_study(rng: np.random.Generator, shape: tuple[int, int, int], lesions: int):
    """Ball lesions; the prediction finds most of them (shifted, eroded or grown) and adds
    false-positive blobs, like a real network's output."""
    gt = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    low, high = np.array(shape) // 8, np.array(shape) * 7 // 8

    def ball(target: np.ndarray, centre: np.ndarray, radius: int) -> None:
        box = tuple(slice(max(c - radius, 0), c + radius + 1) for c in centre)
        grid = np.ogrid[box]
        target[box] |= (
            sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
        ).astype(np.uint8)

    for _ in range(lesions):
        centre, radius = rng.integers(low, high), int(rng.integers(2, 9))
        ball(gt, centre, radius)
        if rng.random() < 0.8:  # detected
            ball(
                pred,
                centre + rng.integers(-1, 2, size=3),
                max(1, radius + int(rng.integers(-1, 2))),
            )
    for _ in range(lesions):
        ball(pred, rng.integers(low, high), int(rng.integers(1, 6)))
    return gt, pred


def scipy_counts(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    structure = ndi.generate_binary_structure(3, 2)  # 18-connectivity
    gt, pred = gt.astype(bool), pred.astype(bool)
    both = gt & pred

    def untouched_voxels(mask: np.ndarray) -> int:
        labels, n = ndi.label(mask, structure)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        hit = np.zeros(n + 1, dtype=bool)
        hit[np.unique(labels[both])] = True
        return int(sizes[1:][~hit[1:]].sum())

    return untouched_voxels(pred), untouched_voxels(gt)


def ours_counts(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    counts = metrics.overlap_counts(gt, pred)
    return counts["fp_voxels"], counts["fn_voxels"]


def official_counts(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    return int(official.false_pos_pix(gt, pred)), int(official.false_neg_pix(gt, pred))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[326, 400, 400], help="z y x")
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--lesions", type=int, default=20, help="lesions (and FP blobs) per study")
    parser.add_argument("--skip-official", action="store_true", help="skip the per-component loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    methods = {"ours (cc3d + bincount)": ours_counts, "scipy.ndimage.label": scipy_counts}
    if not args.skip_official:
        methods["official (isin per component)"] = official_counts
    rng = np.random.default_rng(args.seed)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    components = []
    for _ in range(args.studies):
        gt, pred = synthetic_study(rng, tuple(args.shape), args.lesions)
        results = {}
        for name, method in methods.items():
            start = time.perf_counter()
            results[name] = method(gt, pred)
            seconds[name].append(time.perf_counter() - start)
        if len(set(results.values())) != 1:
            raise SystemExit(f"methods disagree on (FP, FN) voxels: {results}")
        counts = metrics.overlap_counts(gt, pred)
        components.append(counts["tp_lesions"] + counts["fn_lesions"] + counts["fp_lesions"])

    baseline = statistics.median(seconds["scipy.ndimage.label"])
    shape = "x".join(str(n) for n in args.shape[::-1])
    print(
        f"autoPET metrics, {args.studies} synthetic studies of {shape} (x*y*z) voxels, "
        f"{statistics.mean(components):.0f} components per study on average"
    )
    print(f"{'method':32s} {'s/study (median)':>17s} {'min':>8s} {'vs scipy':>9s}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:32s} {median:17.3f} {min(values):8.3f} {median / baseline:8.2f}x")


if __name__ == "__main__":
    main()
