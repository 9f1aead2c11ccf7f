"""Step maps and their expansion against an independent scipy reference of both presets."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from stepseg import nifti, targets
from stepseg.errors import StudyError

SHAPE = (14, 40, 44)

# The channel definitions of the issue, written out again here (not taken from the code).
RELEASED_STEPS = [((1, 2, 2), 2), ((1, 3, 3), 4), ((1, 4, 4), 3)]
PAPER_STEPS = [
    ((1, 2, 2), 2),
    ((1, 2, 2), 2),
    ((2, 3, 3), 2),
    ((2, 3, 3), 4),
    ((2, 3, 3), 8),
    ((2, 3, 3), 16),
]


def ball(semi_axes):
    grid = np.mgrid[tuple(slice(-a, a + 1) for a in semi_axes)]
    return sum((g / max(a, 1)) ** 2 for g, a in zip(grid, semi_axes, strict=True)) <= 1


def reference_masks(mask, schedule):
    """[GT, M1, ..., Mk, Mwhole] by chained scipy dilations."""
    masks = [mask]
    for semi_axes, iterations in schedule:
        masks.append(ndimage.binary_dilation(masks[-1], ball(semi_axes), iterations=iterations))
    masks.append(np.ones_like(mask) if mask.any() else np.zeros_like(mask))
    return masks


def reference_channels(preset_name, mask, pet, ct):
    window = (np.clip(ct * 500 - 1000, -100, 100) + 100) / 200
    if preset_name == "released_code":
        gt, m1, m2, m3, whole = reference_masks(mask, RELEASED_STEPS)
        zero = np.zeros_like(pet)
        return [
            gt * 1.0,
            zero,
            m1 * ct,
            m1 * pet,
            (m2 & ~gt) * window,
            (m3 & ~gt) * pet,
            (whole & ~gt) * ct,
            zero,
        ]
    gt, m1, m2, m3, m4, m5, m6, whole = reference_masks(mask, PAPER_STEPS)
    return [
        gt * 1.0,
        m1 * ct,
        m2 * pet,
        m3 * window,
        (m4 & ~gt) * pet,
        (m5 & ~gt) * ct,
        (m6 & ~gt) * pet,
        (whole & ~gt) * ct,
    ]


def hand_made_masks():
    single = np.zeros(SHAPE, bool)
    single[7, 20, 22] = True
    two = np.zeros(SHAPE, bool)
    two[3:5, 8:11, 9:12] = True
    two[10, 30:33, 34] = True
    border = np.zeros(SHAPE, bool)
    border[0, 0, 0:3] = True
    border[-1, -1, -1] = True
    return {
        "single voxel": single,
        "two lesions": two,
        "at the border": border,
        "empty": np.zeros(SHAPE, bool),
    }


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    pet = rng.normal(1.0, 0.5, SHAPE).astype(np.float32)
    ct = rng.uniform(0, 4, SHAPE).astype(np.float32)
    return pet, ct


@pytest.mark.parametrize("preset_name", ["paper", "released_code"])
@pytest.mark.parametrize("case", list(hand_made_masks()))
def test_step_map_and_expansion_equal_the_channel_definitions(preset_name, case, image):
    mask = hand_made_masks()[case]
    preset = targets.PRESETS[preset_name]
    steps = targets.step_map(mask, preset)
    assert steps.dtype == np.uint8
    schedule = RELEASED_STEPS if preset_name == "released_code" else PAPER_STEPS
    for k, reference in enumerate(reference_masks(mask, schedule)):
        np.testing.assert_array_equal(steps <= k, reference, err_msg=f"{case}: step {k}")
    if not mask.any():
        assert (steps == 255).all()

    pet, ct = image
    image_t = torch.from_numpy(np.stack([pet, ct]))[None]
    out = targets.expand(torch.from_numpy(steps)[None, None], image_t, preset)
    assert out.shape == (1, 8, *SHAPE) and out.dtype == torch.float32
    for c, reference in enumerate(reference_channels(preset_name, mask, pet, ct)):
        np.testing.assert_allclose(out[0, c].numpy(), reference, atol=1e-6, err_msg=f"channel {c}")
    if not mask.any():
        assert not out.any()


def test_channels_grow_and_the_last_covers_the_image():
    mask = hand_made_masks()["single voxel"]
    big = np.zeros((40, 120, 120), bool)
    big[20, 60, 60] = True
    for m in (mask, big):
        steps = targets.step_map(m, targets.PAPER)
        covered = [int((steps <= k).sum()) for k in range(8)]
        assert covered == sorted(covered) and len(set(covered[:6])) == 6
        assert covered[-1] == m.size
    assert targets.PAPER.n_channels == targets.RELEASED_CODE.n_channels == 8
    assert targets.PAPER.channel_losses == ["dicefocal"] + ["mse"] * 7
    assert targets.RELEASED_CODE.channel_losses == ["dicefocal"] * 2 + ["mse"] * 5 + ["none"]


def test_lesion_free_patch_of_a_lesion_study_keeps_its_outer_channels(image):
    mask = hand_made_masks()["single voxel"]
    steps = targets.step_map(mask, targets.RELEASED_CODE)
    patch = torch.from_numpy(steps[:, :, :6].copy())[None, None]  # far from the lesion
    pet, ct = image
    img = torch.from_numpy(np.stack([pet[:, :, :6], ct[:, :, :6]]))[None]
    out = targets.expand(patch, img, targets.RELEASED_CODE)
    assert not out[0, 0].any()
    torch.testing.assert_close(out[0, 6], img[0, 1])  # whole-image CT channel


def test_custom_schedule_from_settings():
    settings = {
        "preset": "released_code",
        "steps": [{"semi_axes": [0, 1, 1], "iterations": 1}, "whole"],
        "channels": [
            {"step": 0, "fill": "one", "loss": "dicefocal"},
            {"step": 1, "fill": "pet"},
            {"step": 2, "fill": "ct", "hollow": True},
        ],
    }
    preset = targets.preset_from_settings(settings)
    assert preset.n_channels == 3 and preset.whole_step == 2
    mask = np.zeros((3, 5, 5), bool)
    mask[1, 2, 2] = True
    steps = targets.step_map(mask, preset)
    assert (steps[1, 1:4, 2] == [1, 0, 1]).all() and steps[0, 2, 2] == 2
    assert targets.Preset.from_dict(preset.to_dict()) == preset
    with pytest.raises(ValueError, match="uses step 9"):
        targets.preset_from_settings({"preset": "paper", "channels": [{"step": 9}]})
    with pytest.raises(ValueError, match="not one of"):
        targets.preset_from_settings({"preset": "nnunet"})


def write_inputs(folder, seg, suv=None, ct=None, suv_affine=None):
    affine = np.diag([2.04, 2.04, 3.0, 1.0])
    suv = np.ones(seg.shape, np.float32) if suv is None else suv
    ct = np.zeros(seg.shape, np.int16) if ct is None else ct
    nifti.save(nifti.Volume(seg, affine), folder / "SEG.nii.gz", dtype=np.uint8)
    nifti.save(
        nifti.Volume(suv, affine if suv_affine is None else suv_affine), folder / "SUV.nii.gz"
    )
    nifti.save(nifti.Volume(ct, affine), folder / "CTres.nii.gz")
    return [folder / n for n in ("SEG.nii.gz", "SUV.nii.gz", "CTres.nii.gz")]


def test_write_study_targets_writes_steps_and_qc(tmp_path):
    seg = hand_made_masks()["two lesions"].astype(np.uint8)
    paths = write_inputs(tmp_path, seg)
    targets.write_study_targets(
        "s1", *paths, tmp_path / "steps.nii.gz", tmp_path / "qc.png", {"preset": "released_code"}
    )
    steps = nifti.load(tmp_path / "steps.nii.gz", "s1")
    assert steps.array.dtype == np.uint8
    np.testing.assert_array_equal(steps.array, targets.step_map(seg > 0, targets.RELEASED_CODE))
    np.testing.assert_allclose(steps.affine, nifti.load(paths[0], "s1").affine)
    assert (tmp_path / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("shape", "shape"),
        ("affine", "affine differs"),
        ("nan", "NaN"),
        ("negative", "negative"),
        ("labels", "not binary"),
    ],
)
def test_bad_inputs_name_the_study_and_file(tmp_path, problem, message):
    seg = np.zeros((4, 6, 8), np.uint8)
    suv = np.ones((4, 6, 8), np.float32)
    suv_affine = None
    if problem == "shape":
        suv = np.ones((4, 6, 9), np.float32)
    elif problem == "affine":
        suv_affine = np.diag([2.0, 2.04, 3.0, 1.0])
    elif problem == "nan":
        suv[1, 2, 3] = np.nan
    elif problem == "negative":
        suv[1, 2, 3] = -0.5
    else:
        seg[0, 0, 0] = 2
    paths = write_inputs(tmp_path, seg, suv=suv, suv_affine=suv_affine)
    with pytest.raises(StudyError, match=message) as error:
        targets.write_study_targets(
            "PETCT_bad", *paths, tmp_path / "steps.nii.gz", tmp_path / "qc.png", {"preset": "paper"}
        )
    assert "study PETCT_bad" in str(error.value) and ".nii.gz" in str(error.value)
    assert not (tmp_path / "steps.nii.gz").exists()
