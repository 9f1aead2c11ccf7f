"""Target presets: the dilation schedule (radii in mm) and the channel definitions.

The network predicts C channels: the lesion mask plus auxiliary channels in which the mask is
dilated step by step until it covers the image, the covered area filled with the normalised PET
or CT. A `Preset` says which dilations (`DilationStep`, in mm (z, y, x), so that a schedule means
the same on every grid; `Preset.voxel_steps` rounds them to whole voxels with the study's
spacing: at the authors' 3 x 2.04 x 2.04 mm grid the `released_code` preset gives exactly their
voxel radii) and what each channel holds (`Channel`). `stepseg.stepmap` turns a mask into a step
map with the schedule, `stepseg.channels` a step map into the channels. Stored with the LMDB, so
that training builds the targets the pack rule was configured with.

Two presets (see config/README.md): `released_code` reproduces the authors' released code;
`paper` has seven genuinely growing auxiliary channels, the last covering the whole crop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from stepseg.settings import Channel, DilationStep, Loss, TargetsSettings
from stepseg.stepmap import NEVER, VoxelStep


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
        """The preset of `to_dict` (a model file's); steps and channels are checked like
        configured ones, keys left out take `settings.DilationStep`'s and `Channel`'s defaults."""
        name = str(data["name"])
        steps = tuple(
            DilationStep.from_mapping(s, f"preset {name} step {i}")
            for i, s in enumerate(data["steps"])
        )
        channels = tuple(
            Channel.from_mapping(c, f"preset {name} channel {i}")
            for i, c in enumerate(data["channels"])
        )
        preset = cls(name=name, steps=steps, channels=channels)
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


_WHOLE = DilationStep(semi_axes_mm=None)


def _released_mm(z: int, y: int, x: int) -> tuple[float, float, float]:
    """Voxel radii at the authors' grid (3 x 2.04 x 2.04 mm) in mm."""
    return (z * 3.0, y * 2.04, x * 2.04)


# The released code's `direct_whole` mode (data_loader_3d.py): dilate_3d with semisizes
# (1, 2, 2) x 2, (1, 3, 3) x 4, (1, 4, 4) x 3 voxels at 3 x 2.04 x 2.04 mm, then the whole crop.
RELEASED_CODE = Preset(
    name="released_code",
    steps=(
        DilationStep(semi_axes_mm=_released_mm(1, 2, 2), iterations=2),
        DilationStep(semi_axes_mm=_released_mm(1, 3, 3), iterations=4),
        DilationStep(semi_axes_mm=_released_mm(1, 4, 4), iterations=3),
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
        DilationStep(semi_axes_mm=(3.0, 4.0, 4.0), iterations=2),
        DilationStep(semi_axes_mm=(3.0, 4.0, 4.0), iterations=2),
        DilationStep(semi_axes_mm=(3.0, 8.0, 8.0), iterations=2),
        DilationStep(semi_axes_mm=(3.0, 8.0, 8.0), iterations=4),
        DilationStep(semi_axes_mm=(6.0, 12.0, 12.0), iterations=3),
        DilationStep(semi_axes_mm=(6.0, 12.0, 12.0), iterations=4),
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


def preset_from_settings(settings: TargetsSettings) -> Preset:
    """The configured preset; `steps` / `channels` in the settings replace the preset's own."""
    preset = PRESETS[settings.preset]
    if settings.steps is None and settings.channels is None:
        return preset
    custom = Preset(
        name=f"{preset.name}+custom",
        steps=preset.steps
        if settings.steps is None
        else tuple(_WHOLE if step == "whole" else step for step in settings.steps),
        channels=preset.channels if settings.channels is None else settings.channels,
    )
    custom.validate()
    return custom
