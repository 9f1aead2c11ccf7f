"""Step maps by hand: the ellipsoid structuring elements, a single lesion voxel's steps against
radii worked out on paper, and the fast dilation against scipy's on the same element.

The presets' schedules and random crops against chained scipy dilations are in test_targets.py.
"""

import numpy as np
import pytest
from scipy import ndimage

from stepseg import stepmap
from stepseg.stepmap import NEVER, VoxelStep


@pytest.mark.parametrize(
    ("semi_axes", "shape", "voxels"),
    [
        # z = 0: the disk y^2 + x^2 <= 4 (13 voxels); z = +-1: the centre only
        ((1, 2, 2), (3, 5, 5), 13 + 2),
        # z = 0: y^2 + x^2 <= 9 (29); z = +-1: y^2 + x^2 <= 6.75 (21 each); z = +-2: the centre
        ((2, 3, 3), (5, 7, 7), 29 + 2 * 21 + 2),
        ((0, 1, 1), (1, 3, 3), 5),  # a cross in the (y, x) plane
        ((0, 0, 2), (1, 1, 5), 5),  # a segment along x
    ],
)
def test_ellipsoid_structuring_elements(semi_axes, shape, voxels):
    element = stepmap.ellipsoid(semi_axes)
    assert element.dtype == bool and element.shape == shape
    assert int(element.sum()) == voxels
    assert element[tuple(semi_axes)]  # the centre
    np.testing.assert_array_equal(element, element[::-1, ::-1, ::-1])


# (1, 2, 2) once, then (0, 1, 1) twice, then the whole image. By hand from the lesion voxel:
# step 1 is the 15-voxel ellipsoid; step 2 grows it by up to 2 voxels of L1 distance in its own
# (y, x) plane (a cross twice is the L1 diamond of radius 2), never along z: the disk of radius
# 2 becomes the L1 diamond of radius 4 (41 voxels) and the two single voxels at z +-1 diamonds of
# radius 2 (13 each); everything else is step 3.
SCHEDULE = (VoxelStep((1, 2, 2)), VoxelStep((0, 1, 1), 2), VoxelStep(None))
CENTRE = (3, 5, 5)


def test_a_single_lesion_voxel_by_hand():
    mask = np.zeros((7, 11, 11), bool)
    mask[CENTRE] = True
    steps = stepmap.step_map(mask, SCHEDULE)
    assert steps.dtype == np.uint8
    assert [int((steps <= k).sum()) for k in range(4)] == [1, 15, 41 + 2 * 13, 7 * 11 * 11]
    z, y, x = CENTRE
    assert steps[z, y, :].tolist() == [3, 2, 2, 1, 1, 0, 1, 1, 2, 2, 3]  # along x
    assert steps[z, :, x].tolist() == [3, 2, 2, 1, 1, 0, 1, 1, 2, 2, 3]  # along y
    assert steps[:, y, x].tolist() == [3, 3, 1, 0, 1, 3, 3]  # along z: step 2 stays in-plane
    in_plane = {(1, 1): 1, (2, 1): 2, (2, 2): 2, (3, 1): 2, (3, 2): 3, (4, 0): 2, (4, 1): 3}
    for (dy, dx), value in in_plane.items():
        assert steps[z, y + dy, x - dx] == value, (dy, dx)
    above = {(0, 0): 1, (1, 0): 2, (2, 0): 2, (1, 1): 2, (2, 1): 3, (3, 0): 3}
    for (dy, dx), value in above.items():
        assert steps[z + 1, y - dy, x + dx] == value == steps[z - 1, y + dy, x - dx], (dy, dx)


def test_without_a_whole_image_step_the_rest_is_never():
    mask = np.zeros((7, 11, 11), bool)
    mask[CENTRE] = True
    finite = stepmap.step_map(mask, SCHEDULE[:2])
    whole = stepmap.step_map(mask, SCHEDULE)
    np.testing.assert_array_equal(finite, np.where(whole == 3, NEVER, whole))
    assert (stepmap.step_map(np.zeros((2, 3, 4), bool), SCHEDULE) == NEVER).all()


@pytest.mark.parametrize(
    "semi_axes", [(0, 0, 0), (1, 0, 0), (0, 1, 3), (2, 1, 0), (1, 2, 2), (3, 3, 3)]
)
@pytest.mark.parametrize("shape", [(9, 13, 17), (2, 3, 4)], ids=["volume", "smaller than reach"])
def test_fast_dilation_equals_scipys(semi_axes, shape):
    """One 1-D maximum filter per run width plus shifted ORs == scipy's dilation by the same
    ellipsoid with a background border, also when the element is larger than the volume."""
    rng = np.random.default_rng(sum(semi_axes) + len(shape))
    for density in (0.01, 0.1):
        mask = rng.random(shape) < density
        mask[tuple(n // 2 for n in shape)] = True
        expected = ndimage.binary_dilation(mask, stepmap.ellipsoid(semi_axes))
        np.testing.assert_array_equal(stepmap.dilate_ellipsoid(mask, semi_axes), expected)
