"""Step maps: a lesion mask's chained ellipsoid dilations on one grid, as one uint8 volume.

For every voxel the step map holds the first dilation step that covers it (0 = lesion, k = step
k, `NEVER` = 255 = never); every auxiliary target mask is then `steps <= k`. The image is the
*input crop* (as in the paper and the authors' code): its own lesion mask is dilated inside the
crop (outside counts as background), and a crop without lesion voxels is `NEVER` everywhere.
`stepseg.presets` says which steps (`Preset.voxel_steps`); numpy and scipy only, so the targets
stage and the training loader share it without the stage importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

NEVER = 255


@dataclass(frozen=True)
class VoxelStep:
    """A dilation step on one grid: ellipsoid semi-axes in voxels (None = the whole image)."""

    semi_axes: tuple[int, int, int] | None
    iterations: int = 1

    @property
    def whole(self) -> bool:
        return self.semi_axes is None


def ellipsoid(semi_axes: tuple[int, int, int]) -> np.ndarray:
    """Boolean ellipsoid structuring element with the given (z, y, x) semi-axes in voxels."""
    grids = np.ogrid[tuple(slice(-a, a + 1) for a in semi_axes)]
    return sum((g / max(a, 1)) ** 2 for g, a in zip(grids, semi_axes, strict=True)) <= 1.0


def step_map(mask: np.ndarray, steps_on_grid: Sequence[VoxelStep]) -> np.ndarray:
    """For each voxel the first step covering it (0 lesion, k step k, 255 never) as uint8.

    `steps_on_grid` is `Preset.voxel_steps(spacing)`. Equals chained
    `scipy.ndimage.binary_dilation(mask, ellipsoid(semi_axes), iterations)` (outside the volume
    counts as background), computed faster: each dilation runs only inside the bounding box of
    the previous mask grown by the step's reach (voxels further away cannot be reached), and
    each ellipsoid dilation is split into one 1-D maximum filter per run width along x plus
    shifted ORs of its (z, y) rows. Without a lesion voxel every voxel is 255 (never).
    """
    mask = np.asarray(mask, dtype=bool)
    steps = np.full(mask.shape, NEVER, dtype=np.uint8)
    if not mask.any():
        return steps
    steps[mask] = 0
    current = mask
    for value, step in enumerate(steps_on_grid, start=1):
        if step.whole:
            steps[steps == NEVER] = value
            break
        box = _reach_box(current, [a * step.iterations for a in step.semi_axes])
        grown_box = current[box]
        for _ in range(step.iterations):
            grown_box = dilate_ellipsoid(grown_box, step.semi_axes)
        view = steps[box]
        view[grown_box & (view == NEVER)] = value
        current = steps <= value
    return steps


def dilate_ellipsoid(mask: np.ndarray, semi_axes: tuple[int, int, int]) -> np.ndarray:
    """One binary dilation by `ellipsoid(semi_axes)`, identical to scipy's (background border)."""
    structure = ellipsoid(semi_axes)
    centre_z, centre_y, centre_x = semi_axes
    half_widths: dict[tuple[int, int], int] = {}
    for dz in range(structure.shape[0]):
        for dy in range(structure.shape[1]):
            row = np.nonzero(structure[dz, dy])[0]
            if row.size:
                half_widths[(dz - centre_z, dy - centre_y)] = int(row.max()) - centre_x
    source = mask.view(np.uint8)
    by_width = {
        width: ndimage.maximum_filter1d(source, 2 * width + 1, axis=2, mode="constant")
        for width in set(half_widths.values())
    }
    out = np.zeros_like(source)
    depth, height = mask.shape[:2]
    for (dz, dy), width in half_widths.items():
        if abs(dz) >= depth or abs(dy) >= height:
            continue
        target = out[max(dz, 0) : depth + min(dz, 0), max(dy, 0) : height + min(dy, 0)]
        target |= by_width[width][
            max(-dz, 0) : depth - max(dz, 0), max(-dy, 0) : height - max(dy, 0)
        ]
    return out.view(bool)


def _reach_box(mask: np.ndarray, reach: list[int]) -> tuple[slice, ...]:
    """Bounding box of `mask` grown by `reach` voxels per axis, clipped to the volume."""
    box = []
    for axis, (r, n) in enumerate(zip(reach, mask.shape, strict=True)):
        others = tuple(a for a in range(3) if a != axis)
        index = np.nonzero(mask.any(axis=others))[0]
        box.append(slice(max(int(index[0]) - r, 0), min(int(index[-1]) + r + 1, n)))
    return tuple(box)
