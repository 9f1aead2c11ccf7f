"""Step maps, their expansion into channels and the targets stage against an independent scipy
reference of both presets."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from stepseg import channels, nifti, presets, stepmap, targets
from stepseg.errors import StudyError
from stepseg.settings import TargetsSettings

SRC = Path(__file__).resolve().parents[1] / "src"
SHAPE = (14, 40, 44)
# the authors' grid: the released code's voxel radii hold here
AUTHORS_SPACING = (3.0, 2.04, 2.04)

# The channel definitions, written out again here in voxels at the authors' grid (not taken
# from the code): the released code's dilate_3d calls, and the paper preset's mm radii
# (3, 4, 4) x 2 twice, (3, 8, 8) x 2, (3, 8, 8) x 4, (6, 12, 12) x 3, (6, 12, 12) x 4 rounded
# by hand (4 / 2.04 = 1.96 -> 2, 8 / 2.04 = 3.92 -> 4, 12 / 2.04 = 5.88 -> 6).
RELEASED_STEPS = [((1, 2, 2), 2), ((1, 3, 3), 4), ((1, 4, 4), 3)]
PAPER_STEPS = [
    ((1, 2, 2), 2),
    ((1, 2, 2), 2),
    ((1, 4, 4), 2),
    ((1, 4, 4), 4),
    ((2, 6, 6), 3),
    ((2, 6, 6), 4),
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
            (m2 & ~gt) * window * 4.8,  # clip(ct, 1.8, 2.2) * 12 - 21.6
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
    preset = presets.PRESETS[preset_name]
    steps = stepmap.step_map(mask, preset.voxel_steps(AUTHORS_SPACING))
    assert steps.dtype == np.uint8
    schedule = RELEASED_STEPS if preset_name == "released_code" else PAPER_STEPS
    for k, reference in enumerate(reference_masks(mask, schedule)):
        np.testing.assert_array_equal(steps <= k, reference, err_msg=f"{case}: step {k}")
    if not mask.any():
        assert (steps == 255).all()

    pet, ct = image
    image_t = torch.from_numpy(np.stack([pet, ct]))[None]
    out = channels.expand(torch.from_numpy(steps)[None, None], image_t, preset)
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
        steps = stepmap.step_map(m, presets.PAPER.voxel_steps(AUTHORS_SPACING))
        covered = [int((steps <= k).sum()) for k in range(8)]
        assert covered == sorted(covered) and len(set(covered[:6])) == 6
        assert covered[-1] == m.size
    assert presets.PAPER.n_channels == presets.RELEASED_CODE.n_channels == 8
    assert presets.PAPER.channel_losses == ["dicefocal"] + ["mse"] * 7
    assert presets.RELEASED_CODE.channel_losses == ["dicefocal"] * 2 + ["mse"] * 5 + ["none"]


@pytest.mark.parametrize("preset_name", ["paper", "released_code"])
def test_random_crops_of_random_masks_equal_dilating_the_crop(preset_name, image):
    """The released code's construction restated: crop first, then dilate the crop's own mask
    with scipy (outside the crop is background); a crop without lesion gets all-zero channels."""
    preset = presets.PRESETS[preset_name]
    schedule = RELEASED_STEPS if preset_name == "released_code" else PAPER_STEPS
    pet, ct = image
    rng = np.random.default_rng(7)
    lesion_free_crops = 0
    for _ in range(16):
        seeds = rng.random((20, 60, 60)) < 3e-5
        seeds[tuple(rng.integers(0, n) for n in (20, 60, 60))] = True  # a lesion study
        study = ndimage.binary_dilation(seeds, iterations=1)
        z, y, x = (
            int(rng.integers(0, n - c + 1)) for n, c in zip((20, 60, 60), SHAPE, strict=True)
        )
        crop = study[z : z + SHAPE[0], y : y + SHAPE[1], x : x + SHAPE[2]]
        lesion_free_crops += not crop.any()
        steps = stepmap.step_map(crop, preset.voxel_steps(AUTHORS_SPACING))
        for k, reference in enumerate(reference_masks(crop, schedule)):
            np.testing.assert_array_equal(steps <= k, reference, err_msg=f"step {k}")
        out = channels.expand(
            torch.from_numpy(steps)[None, None], torch.from_numpy(np.stack([pet, ct]))[None], preset
        )
        for c, reference in enumerate(reference_channels(preset_name, crop, pet, ct)):
            np.testing.assert_allclose(out[0, c].numpy(), reference, atol=1e-5)
    # the draw includes lesion-free crops of lesion studies and crops with lesions
    assert 1 <= lesion_free_crops <= 15


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
        "s1",
        *paths,
        tmp_path / "steps.nii.gz",
        tmp_path / "qc.png",
        TargetsSettings(preset="released_code"),
    )
    steps = nifti.to_stored(nifti.load(tmp_path / "steps.nii.gz", "s1"))  # as the files store it
    assert steps.array.dtype == np.uint8
    # the files' grid is the authors' (affine diag 2.04, 2.04, 3): their voxel radii
    for k, reference in enumerate(reference_masks(seg > 0, RELEASED_STEPS)):
        np.testing.assert_array_equal(steps.array <= k, reference, err_msg=f"step {k}")
    np.testing.assert_array_equal(steps.affine, nifti.load(paths[0], "s1").stored_affine)
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
            "PETCT_bad", *paths, tmp_path / "steps.nii.gz", tmp_path / "qc.png", TargetsSettings()
        )
    assert "study PETCT_bad" in str(error.value) and ".nii.gz" in str(error.value)
    assert not (tmp_path / "steps.nii.gz").exists()


@pytest.mark.parametrize("module", ["stepseg.targets", "stepseg.qc"])
def test_the_targets_stage_does_not_import_torch(module):
    """The targets rule runs in envs/io.yaml, which has no torch."""
    code = (
        f"import sys, {module}\n"
        f"print({module}.__file__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    path, imported = result.stdout.splitlines()
    assert Path(path).is_relative_to(SRC) and imported == "[]"
