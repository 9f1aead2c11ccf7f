"""Expansion of step maps into target channels, value by value on a hand-made preset.

Both real presets against chained scipy dilations are in test_targets.py.
"""

import pytest
import torch

from stepseg import channels
from stepseg.presets import Channel, DilationStep, Preset
from stepseg.stepmap import NEVER

# Every kind of channel: each fill, hollow or not, an all-zero channel (step None).
PRESET = Preset(
    name="by hand",
    steps=(
        DilationStep(semi_axes_mm=(3.0, 4.0, 4.0)),
        DilationStep(semi_axes_mm=(3.0, 8.0, 8.0)),
        DilationStep(semi_axes_mm=None),
    ),
    channels=(
        Channel(step=0, fill="one", loss="dicefocal"),
        Channel(step=1, fill="pet"),
        Channel(step=2, fill="ct", hollow=True),
        Channel(step=3, fill="ct_window", window=(-100.0, 100.0), window_scale=4.8),
        Channel(step=None),
        Channel(step=3, fill="one", hollow=True),
    ),
)
# Six voxels along x in two crops: the first crop's step map as written, the second a crop of a
# lesion study without lesion voxels (all NEVER). The normalised CT is (HU + 1000) / 500.
STEPS = [[0, 1, 2, 3, NEVER, 1], [NEVER] * 6]
PET = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
HU = [-1000.0, -150.0, -50.0, 0.0, 60.0, 200.0]
CT = [(hu + 1000) / 500 for hu in HU]  # 0, 1.7, 1.9, 2, 2.12, 2.4
EXPECTED = [  # the first crop's channels
    [1, 0, 0, 0, 0, 0],  # the lesion
    [0.5, 1.5, 0, 0, 0, 5.5],  # PET up to step 1
    [0, 1.7, 1.9, 0, 0, 2.4],  # CT up to step 2, the lesion removed
    # HU clipped to [-100, 100] and scaled to [0, 4.8] up to step 3: -1000 -> 0, -150 -> 0,
    # -50 -> 1.2, 0 -> 2.4, 60 never reached, 200 -> 4.8
    [0, 0, 1.2, 2.4, 0, 4.8],
    [0] * 6,
    [0, 1, 1, 1, 0, 1],  # the whole crop but the lesion
]


def test_each_channel_by_hand():
    PRESET.validate()
    steps = torch.tensor(STEPS, dtype=torch.uint8).reshape(2, 1, 1, 1, 6)
    image = torch.tensor([[PET, CT], [PET, CT]]).reshape(2, 2, 1, 1, 6)
    out = channels.expand(steps, image, PRESET)
    assert out.shape == (2, 6, 1, 1, 6) and out.dtype == torch.float32
    expected = torch.tensor(EXPECTED, dtype=torch.float32).reshape(6, 1, 1, 6)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
    assert not out[1].any()  # no lesion voxel in the crop: all zero, the whole crop included


@pytest.mark.parametrize(
    ("steps_shape", "image_shape"),
    [((2, 1, 6), (2, 2, 1, 1, 6)), ((2, 2, 1, 1, 6), (2, 2, 1, 1, 6)), ((2, 1, 1, 1, 6),) * 2],
)
def test_other_layouts_are_refused(steps_shape, image_shape):
    with pytest.raises(ValueError) as error:
        channels.expand(
            torch.zeros(steps_shape, dtype=torch.uint8), torch.zeros(image_shape), PRESET
        )
    assert str(error.value) == (
        f"expected steps (B,1,D,H,W) and image (B,2,D,H,W), got {steps_shape} and {image_shape}"
    )
