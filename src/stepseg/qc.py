"""QC figures: what a stage wrote, at a glance (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stepseg.atomic import atomic_file
from stepseg.presets import Preset


def write_step_contours(
    study: str,
    suv: np.ndarray,
    steps: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    preset: Preset,
    path: str | Path,
) -> None:
    """Coronal MIP of the SUV with the contour of each step: a glance shows the schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mip = suv.max(axis=1)  # (z, x): coronal projection along y
    nearest = steps.min(axis=1)
    aspect = spacing_zyx[0] / spacing_zyx[2]
    fig, ax = plt.subplots(figsize=(4, 4 * mip.shape[0] * aspect / max(mip.shape[1], 1) + 0.6))
    ax.imshow(
        mip,
        cmap="gray_r",
        origin="lower",
        aspect=aspect,
        vmin=0,
        vmax=max(float(np.percentile(mip, 99.5)), 1e-3),
    )
    colours = plt.cm.autumn(np.linspace(0, 1, len(preset.steps) + 1))
    for value in range(len(preset.steps) + 1):
        covered = nearest <= value
        if covered.any() and not covered.all():
            ax.contour(covered, levels=[0.5], colors=[colours[value]], linewidths=0.8)
    ax.set_title(f"{study}: preset {preset.name}", fontsize=8)
    ax.set_axis_off()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
