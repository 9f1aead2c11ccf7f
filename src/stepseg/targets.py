"""Step-by-step targets: chained dilations of the lesion mask of one input crop, as one step map.

The network predicts C channels: the lesion mask plus auxiliary channels in which the mask is
dilated step by step until it covers the image, the covered area filled with the normalised PET
or CT. As in the paper ("for input images without lesions, all channels of the output are zeros")
and the authors' code, the image is the *input crop*: its own lesion mask is dilated inside the
crop (outside counts as background), and a crop without lesion voxels gets all-zero channels, the
whole-image channel included. Instead of C float volumes we build one uint8 *step map* per crop
(`step_map`): for every voxel the first dilation step that covers it (0 = lesion, k = step k,
255 = never). Every auxiliary mask is then `steps <= k`, and `expand` builds the C channels from
the step maps and the normalised input crops on whatever device they live on.

Dilation radii are in mm (z, y, x), so that a schedule means the same on every grid; `voxel_steps`
rounds them to whole voxels with the study's spacing (at the authors' 3 x 2.04 x 2.04 mm grid the
`released_code` preset gives exactly their voxel radii).

Two presets (see config/README.md): `released_code` reproduces the authors' released code;
`paper` has seven genuinely growing auxiliary channels, the last covering the whole crop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from stepseg import nifti
from stepseg.atomic import atomic_file
from stepseg.checks import check_suv
from stepseg.errors import StudyError
from stepseg.normalize import ct_from_normalized

log = logging.getLogger(__name__)

NEVER = 255
Fill = Literal["one", "pet", "ct", "ct_window"]
Loss = Literal["dicefocal", "mse", "none"]
PET_CHANNEL, CT_CHANNEL = 0, 1


@dataclass(frozen=True)
class DilationStep:
    """`iterations` dilations of the previous step's mask by an ellipsoid of `semi_axes_mm`
    (z, y, x); `semi_axes_mm=None` means "the whole image"."""

    semi_axes_mm: tuple[float, float, float] | None
    iterations: int = 1

    @property
    def whole(self) -> bool:
        return self.semi_axes_mm is None


@dataclass(frozen=True)
class VoxelStep:
    """A `DilationStep` on one grid: ellipsoid semi-axes in voxels (None = the whole image)."""

    semi_axes: tuple[int, int, int] | None
    iterations: int = 1

    @property
    def whole(self) -> bool:
        return self.semi_axes is None


@dataclass(frozen=True)
class Channel:
    """One output channel: the mask of step `step` (0 = lesion; None = all-zero) times `fill`.

    `hollow` zeroes the lesion voxels (the released code does so for its outer channels, so
    they describe the surroundings only). `window` is the HU window of a `ct_window` fill,
    rescaled to [0, `window_scale`] (the released code: [-100, 100] HU to [0, 4.8]). `loss`
    tells the trainer which loss this channel gets.
    """

    step: int | None
    fill: Fill = "one"
    hollow: bool = False
    loss: Loss = "mse"
    window: tuple[float, float] | None = None
    window_scale: float = 1.0


@dataclass(frozen=True)
class Preset:
    """Dilation schedule plus channel definitions; stored with the LMDB so training agrees."""

    name: str
    steps: tuple[DilationStep, ...]
    channels: tuple[Channel, ...] = field(default_factory=tuple)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def channel_losses(self) -> list[Loss]:
        return [channel.loss for channel in self.channels]

    def voxel_steps(self, spacing_zyx: tuple[float, float, float]) -> tuple[VoxelStep, ...]:
        """The schedule on a grid: each semi-axis rounded to the nearest whole voxel."""
        return tuple(
            VoxelStep(None)
            if step.whole
            else VoxelStep(
                tuple(  # type: ignore[arg-type]
                    math.floor(mm / float(spacing) + 0.5 + 1e-9)
                    for mm, spacing in zip(step.semi_axes_mm, spacing_zyx, strict=True)
                ),
                step.iterations,
            )
            for step in self.steps
        )

    def check_fits(self, spacing_zyx: tuple[float, float, float], patch_size: Any) -> None:
        """Refuse a schedule whose last finite step already covers a whole patch from any
        lesion voxel: the whole-image step after it would repeat it, so the schedule does not
        grow step by step on this grid and patch."""
        finite = [step for step in self.voxel_steps(spacing_zyx) if not step.whole]
        if not finite:
            return
        reach = [sum(s.semi_axes[axis] * s.iterations for s in finite) for axis in range(3)]
        if all(r >= int(p) - 1 for r, p in zip(reach, patch_size, strict=True)):
            raise ValueError(
                f"targets preset {self.name}: its last finite step reaches {reach} voxels "
                f"(z, y, x) at spacing {list(spacing_zyx)} mm, which covers a whole patch "
                f"{list(patch_size)} from any lesion voxel; use smaller radii or a larger patch"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preset:
        steps = tuple(
            DilationStep(
                semi_axes_mm=None if s.get("semi_axes_mm") is None else _zyx(s["semi_axes_mm"]),
                iterations=int(s.get("iterations", 1)),
            )
            for s in data["steps"]
        )
        channels = tuple(
            Channel(
                step=c.get("step"),
                fill=c.get("fill", "one"),
                hollow=bool(c.get("hollow", False)),
                loss=c.get("loss", "mse"),
                window=None if c.get("window") is None else tuple(map(float, c["window"])),
                window_scale=float(c.get("window_scale", 1.0)),
            )
            for c in data["channels"]
        )
        preset = cls(name=str(data.get("name", "custom")), steps=steps, channels=channels)
        preset.validate()
        return preset

    def validate(self) -> None:
        """Refuse schedules that cannot be expanded (bad references, a mid-schedule "whole")."""
        if any(step.whole for step in self.steps[:-1]):
            raise ValueError(f"preset {self.name}: only the last step may be the whole image")
        if len(self.steps) >= NEVER:
            raise ValueError(f"preset {self.name}: at most {NEVER - 1} steps")
        for step in self.steps:
            if not step.whole and (step.iterations < 1 or min(step.semi_axes_mm) < 0):
                raise ValueError(f"preset {self.name}: bad dilation step {step}")
        for index, channel in enumerate(self.channels):
            if channel.step is not None and not 0 <= channel.step <= len(self.steps):
                raise ValueError(
                    f"preset {self.name}: channel {index} uses step {channel.step}, "
                    f"the schedule has steps 0..{len(self.steps)}"
                )
            if channel.fill not in ("one", "pet", "ct", "ct_window"):
                raise ValueError(f"preset {self.name}: channel {index} fill {channel.fill!r}")
            if channel.loss not in ("dicefocal", "mse", "none"):
                raise ValueError(f"preset {self.name}: channel {index} loss {channel.loss!r}")
            if (channel.fill == "ct_window") != (channel.window is not None):
                raise ValueError(
                    f"preset {self.name}: channel {index} needs a window iff ct_window"
                )


def _zyx(values: Any) -> tuple[float, float, float]:
    z, y, x = (float(v) for v in values)
    return (z, y, x)


_WHOLE = DilationStep(semi_axes_mm=None)
# the authors' grid (z, y, x) in mm: their voxel radii times it give the presets' mm radii
RELEASED_SPACING_MM = (3.0, 2.04, 2.04)


def _released_mm(z: int, y: int, x: int) -> tuple[float, float, float]:
    return (z * 3.0, y * 2.04, x * 2.04)


# The released code's `direct_whole` mode (data_loader_3d.py): dilate_3d with semisizes
# (1, 2, 2) x 2, (1, 3, 3) x 4, (1, 4, 4) x 3 voxels at 3 x 2.04 x 2.04 mm, then the whole crop.
RELEASED_CODE = Preset(
    name="released_code",
    steps=(
        DilationStep(_released_mm(1, 2, 2), 2),
        DilationStep(_released_mm(1, 3, 3), 4),
        DilationStep(_released_mm(1, 4, 4), 3),
        _WHOLE,
    ),
    channels=(
        Channel(step=0, fill="one", loss="dicefocal"),
        Channel(step=None, fill="one", loss="dicefocal"),  # the "fake mask": always zero
        Channel(step=1, fill="ct"),
        Channel(step=1, fill="pet"),
        Channel(step=2, fill="ct_window", window=(-100.0, 100.0), window_scale=4.8, hollow=True),
        Channel(step=3, fill="pet", hollow=True),
        Channel(step=4, fill="ct", hollow=True),
        Channel(step=None, fill="one", loss="none"),
    ),
)

# Seven auxiliary channels, each covering the next dilation, the last the whole crop. Reach of
# the six finite steps (z / in-plane, mm): 6/8, 12/16, 18/32, 30/64, 48/100, 72/148, i.e. from
# the released code's first step (M1) growing about 1.5-2x a step up to about the half-width of
# the paper's 32 x 160 x 160 crop at 3 x 2.04 x 2.04 mm (48 / 163 mm), so that no finite step
# covers the crop and the whole-crop step is the only one that does. Only small ellipsoids are
# iterated (cheap to dilate per crop). Fills alternate CT and PET like the released code; the
# inner three keep the lesion (its uptake is the signal), the outer four are hollow (context).
PAPER = Preset(
    name="paper",
    steps=(
        DilationStep((3.0, 4.0, 4.0), 2),
        DilationStep((3.0, 4.0, 4.0), 2),
        DilationStep((3.0, 8.0, 8.0), 2),
        DilationStep((3.0, 8.0, 8.0), 4),
        DilationStep((6.0, 12.0, 12.0), 3),
        DilationStep((6.0, 12.0, 12.0), 4),
        _WHOLE,
    ),
    channels=(
        Channel(step=0, fill="one", loss="dicefocal"),
        Channel(step=1, fill="ct"),
        Channel(step=2, fill="pet"),
        Channel(step=3, fill="ct_window", window=(-100.0, 100.0)),
        Channel(step=4, fill="pet", hollow=True),
        Channel(step=5, fill="ct", hollow=True),
        Channel(step=6, fill="pet", hollow=True),
        Channel(step=7, fill="ct", hollow=True),
    ),
)

PRESETS = {preset.name: preset for preset in (PAPER, RELEASED_CODE)}


def preset_from_settings(settings: dict[str, Any]) -> Preset:
    """The configured preset; `steps` / `channels` in the settings replace the preset's own."""
    name = settings.get("preset", "paper")
    if name not in PRESETS:
        raise ValueError(f"targets.preset {name!r} is not one of {sorted(PRESETS)}")
    data = PRESETS[name].to_dict()
    if "steps" in settings or "channels" in settings:
        data["name"] = f"{name}+custom"
        data["steps"] = [_step_setting(s) for s in settings.get("steps", data["steps"])]
        data["channels"] = settings.get("channels", data["channels"])
    return Preset.from_dict(data)


def _step_setting(step: Any) -> dict[str, Any]:
    """A configured step: `whole` or `{semi_axes_mm, iterations}`."""
    return {"semi_axes_mm": None} if step == "whole" else dict(step)


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


def expand(steps: torch.Tensor, image: torch.Tensor, preset: Preset) -> torch.Tensor:
    """The C-channel target (B, C, D, H, W) float32 from step maps (B, 1, D, H, W) uint8 and
    normalised images (B, 2, D, H, W) [PET, CT], with pure torch ops on their device."""
    if steps.ndim != 5 or steps.shape[1] != 1 or image.shape[1] != 2:
        raise ValueError(
            f"expected steps (B,1,D,H,W) and image (B,2,D,H,W), got "
            f"{tuple(steps.shape)} and {tuple(image.shape)}"
        )
    image = image.float()
    fills = {
        "one": None,
        "pet": image[:, PET_CHANNEL : PET_CHANNEL + 1],
        "ct": image[:, CT_CHANNEL : CT_CHANNEL + 1],
    }
    lesion = steps == 0
    out = torch.zeros(
        (steps.shape[0], preset.n_channels, *steps.shape[2:]),
        dtype=torch.float32,
        device=steps.device,
    )
    for index, channel in enumerate(preset.channels):
        if channel.step is None:
            continue
        covered = steps <= channel.step
        if channel.hollow:
            covered = covered & ~lesion
        if channel.fill == "ct_window":
            low, high = channel.window
            hu = ct_from_normalized(fills["ct"]).clamp(low, high)
            fill = (hu - low) * (channel.window_scale / (high - low))
        else:
            fill = fills[channel.fill]
        target = out[:, index : index + 1]
        if fill is None:
            target.copy_(covered)
        else:
            torch.mul(fill, covered, out=target)  # 3x faster than torch.where on CPU
    return out


def write_study_targets(
    study: str,
    seg_path: str | Path,
    suv_path: str | Path,
    ctres_path: str | Path,
    steps_path: str | Path,
    qc_path: str | Path,
    settings: dict[str, Any],
) -> None:
    """Check one study's inputs, write its step map (uint8 NIfTI, SEG grid) and a QC figure."""
    preset = preset_from_settings(settings)
    seg = nifti.load(seg_path, study)
    suv = nifti.load(suv_path, study, dtype=np.float32)
    ctres = nifti.load(ctres_path, study)
    nifti.check_same_grid(
        study,
        {
            "SEG": (Path(seg_path), seg),
            "SUV": (Path(suv_path), suv),
            "CTres": (Path(ctres_path), ctres),
        },
    )
    check_suv(study, suv.array, suv_path)
    mask = check_binary_mask(study, seg.array, seg_path)
    steps = step_map(mask, preset.voxel_steps(seg.spacing_zyx))
    log.info(
        "study %s: %d lesion voxels, preset %s, steps %s",
        study,
        int(mask.sum()),
        preset.name,
        {int(v): int(n) for v, n in zip(*np.unique(steps, return_counts=True), strict=True)},
    )
    nifti.save(nifti.Volume(steps, seg.affine), steps_path, dtype=np.uint8)
    write_qc_figure(study, suv.array, steps, suv.spacing_zyx, preset, qc_path)


def check_binary_mask(study: str, seg: np.ndarray, path: str | Path) -> np.ndarray:
    """The lesion mask of a SEG volume; labels other than 0/1 mean a conversion went wrong."""
    values = np.unique(seg)
    if not np.isin(values, (0, 1)).all():
        raise StudyError(study, f"SEG is not binary: values {values[:10].tolist()}", path)
    return seg.astype(bool)


def write_qc_figure(
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
