"""Presets: mm radii on a grid, schedules that cannot grow on a patch, custom schedules."""

import typing

import numpy as np
import pytest

from stepseg import presets, stepmap
from stepseg.settings import SettingsError, TargetsSettings

AUTHORS_SPACING = (3.0, 2.04, 2.04)
# the released code's dilate_3d calls in voxels at the authors' grid, written out (not the code's)
RELEASED_STEPS = [((1, 2, 2), 2), ((1, 3, 3), 4), ((1, 4, 4), 3)]


def test_radii_in_mm_follow_the_grid():
    assert presets.RELEASED_CODE.voxel_steps(AUTHORS_SPACING)[:3] == tuple(
        stepmap.VoxelStep(axes, n) for axes, n in RELEASED_STEPS
    )
    # 4.5 mm voxels: 3 / 4.5 = 0.67 -> 1, 4.08 / 4.5 = 0.91 -> 1, 8.16 / 4.5 = 1.81 -> 2
    coarse = presets.RELEASED_CODE.voxel_steps((4.5, 4.5, 4.5))
    assert [s.semi_axes for s in coarse] == [(1, 1, 1), (1, 1, 1), (1, 2, 2), None]


def test_a_schedule_that_covers_the_patch_is_refused():
    presets.PAPER.check_fits(AUTHORS_SPACING, (32, 160, 160))
    presets.PAPER.check_fits((4.5, 4.5, 4.5), (32, 48, 48))
    wide = presets.preset_from_settings(TargetsSettings.from_mapping(
        {"preset": "paper", "steps": [{"semi_axes_mm": [30, 30, 30], "iterations": 4}, "whole"],
         "channels": [{"step": 0, "fill": "one", "loss": "dicefocal"}, {"step": 1}, {"step": 2}]}
    ))  # fmt: skip
    # 30 / 4.5 = 6.67 -> 7 voxels, 4 iterations: 28 voxels from a lesion voxel
    wide.check_fits((4.5, 4.5, 4.5), (16, 16, 30))  # x not covered from the patch's edge
    with pytest.raises(ValueError, match=r"reaches \[28, 28, 28\] voxels .* covers a whole patch"):
        wide.check_fits((4.5, 4.5, 4.5), (16, 16, 29))


def test_custom_schedule_from_settings():
    settings = {
        "preset": "released_code",
        "steps": [{"semi_axes_mm": [0, 2, 2], "iterations": 1}, "whole"],
        "channels": [
            {"step": 0, "fill": "one", "loss": "dicefocal"},
            {"step": 1, "fill": "pet"},
            {"step": 2, "fill": "ct", "hollow": True},
        ],
    }
    preset = presets.preset_from_settings(TargetsSettings.from_mapping(settings))
    assert preset.n_channels == 3 and preset.steps[-1].whole
    mask = np.zeros((3, 5, 5), bool)
    mask[1, 2, 2] = True
    steps = stepmap.step_map(mask, preset.voxel_steps((2.0, 2.0, 2.0)))
    assert (steps[1, 1:4, 2] == [1, 0, 1]).all() and steps[0, 2, 2] == 2
    assert presets.Preset.from_dict(preset.to_dict()) == preset
    with pytest.raises(ValueError, match="uses step 9"):
        presets.preset_from_settings(TargetsSettings.from_mapping({"channels": [{"step": 9}]}))
    with pytest.raises(SettingsError, match=r"^targets\.preset: expected one of 'paper', "):
        TargetsSettings.from_mapping({"preset": "nnunet"})


def test_the_targets_settings_name_exactly_the_presets():
    hints = typing.get_type_hints(TargetsSettings)
    assert set(typing.get_args(hints["preset"])) == set(presets.PRESETS)
    assert presets.preset_from_settings(TargetsSettings()) is presets.PAPER
