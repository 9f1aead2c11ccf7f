"""The targets stage's QC figure, read back as pixels: the coronal MIP drawn at its physical
aspect, and one contour in its own colour per step that neither covers nothing nor everything."""

import numpy as np
import pytest
from matplotlib import image as mpimg

from stepseg import presets, qc, stepmap

PRESET = presets.RELEASED_CODE  # 3 finite steps, then the whole image
# matplotlib's autumn colours of steps 0..3 (step 4, the whole image, has no contour)
STEP_COLOURS = {(255, 0, 0), (255, 64, 0), (255, 128, 0), (255, 192, 0)}
MIP_WIDTH = 310  # pixels: the 4-inch figure at 100 dpi inside the default margins


def draw(tmp_path, shape, spacing, lesion):
    """The QC figure of a uniform SUV (its MIP all black) with a lesion of 3 x 3 voxels in the
    coronal plane or none, as (rows, columns, RGB) uint8."""
    mask = np.zeros(shape, bool)
    z, y, x = (n // 2 for n in shape)
    mask[z - 1 : z + 2, y, x - 1 : x + 2] = lesion
    steps = stepmap.step_map(mask, PRESET.voxel_steps(spacing))
    path = tmp_path / "qc.png"
    qc.write_step_contours("PETCT_a", np.ones(shape, np.float32), steps, spacing, PRESET, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]  # no temp file left
    return np.rint(mpimg.imread(path)[..., :3] * 255).astype(int)


@pytest.mark.parametrize(
    ("shape", "spacing", "height"),
    [
        ((40, 30, 20), (3.0, 2.0, 2.0), 930),  # 120 mm high, 40 mm wide: 3 x 310 pixels
        ((20, 8, 40), (2.0, 2.0, 4.0), 77),  # 40 mm high, 160 mm wide: 310 / 4 = 77.5 pixels
    ],
    ids=["tall", "wide"],
)
def test_the_mip_is_drawn_at_its_physical_aspect(tmp_path, shape, spacing, height):
    pixels = draw(tmp_path, shape, spacing, lesion=True)
    black = pixels.sum(axis=2) == 0
    columns = np.nonzero(black.any(axis=0))[0]
    rows = np.nonzero(black[:, columns[0]])[0]  # the left edge: clear of the title
    assert columns[-1] - columns[0] + 1 == MIP_WIDTH
    assert rows[-1] - rows[0] + 1 == height
    assert pixels.shape[1] < MIP_WIDTH + 30 and pixels.shape[0] < height + 50  # tight margins


def test_one_contour_colour_per_step(tmp_path):
    colours = {tuple(c) for c in draw(tmp_path, (40, 30, 40), (3.0, 2.0, 2.0), True).reshape(-1, 3)}
    assert colours & STEP_COLOURS == STEP_COLOURS
    blank = draw(tmp_path, (40, 30, 40), (3.0, 2.0, 2.0), False)  # every voxel NEVER
    assert not {tuple(c) for c in blank.reshape(-1, 3)} & STEP_COLOURS
