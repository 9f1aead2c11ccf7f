import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
from reference import autopet_official as official

from stepseg import metrics, nifti
from stepseg.errors import StudyError
from stepseg.settings import EvaluateSettings

SPACING = (3.0, 2.0, 1.5)  # (z, y, x) mm -> 9 mm^3 = 0.009 ml per voxel
VOXEL_ML = 0.009


def affine(spacing=SPACING):
    a = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    a[:3, 3] = [100.0, 80.0, -300.0]
    return a


def write(path, array, spacing=SPACING, dtype=np.uint8):
    nifti.save(nifti.Volume(np.asarray(array), affine(spacing)), path, dtype=dtype)
    return path


def empty(shape=(12, 12, 12)):
    return np.zeros(shape, dtype=np.uint8)


# ---- hand-made volumes, metrics computed by hand ------------------------------------------


def two_lesions_case():
    """GT: lesion A (2x2x2 = 8 voxels) and lesion B (5 voxels in a row), far apart.
    Prediction: 4 voxels inside A plus a separate 3-voxel blob away from everything."""
    gt, pred = empty(), empty()
    gt[1:3, 1:3, 1:3] = 1  # A
    gt[8, 8, 2:7] = 1  # B
    pred[1:3, 1:3, 1] = 1  # 4 voxels, all inside A
    pred[6, 1, 8:11] = 1  # false positive blob
    return gt, pred


def test_hand_made_two_lesions_one_missed_one_false_positive():
    gt, pred = two_lesions_case()
    result = metrics.study_metrics(gt, pred, VOXEL_ML)
    # |G| = 13, |P| = 7, |P n G| = 4
    assert result["dice"] == pytest.approx(2 * 4 / (13 + 7), abs=1e-12)
    assert result["fpv_ml"] == pytest.approx(3 * VOXEL_ML, abs=1e-12)
    assert result["fnv_ml"] == pytest.approx(5 * VOXEL_ML, abs=1e-12)  # B is untouched
    assert (result["tp_lesions"], result["fn_lesions"], result["fp_lesions"]) == (1, 1, 1)
    assert result["mtv_true_ml"] == pytest.approx(13 * VOXEL_ML)
    assert result["mtv_pred_ml"] == pytest.approx(7 * VOXEL_ML)
    assert result["has_lesions"] is True


def test_anisotropic_spacing_from_the_header(tmp_path):
    gt, pred = two_lesions_case()
    spacing = (4.0, 2.5, 0.8)  # 8 mm^3 per voxel
    seg = write(tmp_path / "SEG.nii.gz", gt, spacing)
    assert metrics.header_voxel_ml(seg, "S") == pytest.approx(0.008, rel=1e-7)
    suv = write(tmp_path / "SUV.nii.gz", np.ones(gt.shape), spacing, np.float32)
    prd = write(tmp_path / "pred.nii.gz", pred, spacing)
    row = metrics.evaluate_study("S1", seg, suv, prd)
    assert row["fpv_ml"] == pytest.approx(3 * 0.008, rel=1e-7)
    assert row["fnv_ml"] == pytest.approx(5 * 0.008, rel=1e-7)
    assert row["dice"] == pytest.approx(0.4, abs=1e-12)


def test_study_without_lesions_and_empty_prediction():
    result = metrics.study_metrics(empty(), empty(), VOXEL_ML, suv=np.ones((12, 12, 12)))
    assert result["has_lesions"] is False
    assert math.isnan(result["dice"]) and math.isnan(result["fnv_ml"])
    assert result["fpv_ml"] == 0.0
    assert (result["tp_lesions"], result["fn_lesions"], result["fp_lesions"]) == (0, 0, 0)
    assert result["mtv_true_ml"] == 0.0 and result["tlg_true"] == 0.0
    assert math.isnan(result["suvmax_true"]) and math.isnan(result["suvmax_pred"])


def test_study_without_lesions_counts_only_false_positive_volume():
    pred = empty()
    pred[3:5, 3:5, 3:5] = 1
    pred[9, 9, 9] = 1
    result = metrics.study_metrics(empty(), pred, VOXEL_ML)
    assert result["fpv_ml"] == pytest.approx(9 * VOXEL_ML)
    assert result["fp_lesions"] == 2
    assert math.isnan(result["dice"]) and math.isnan(result["fnv_ml"])


def test_lesion_with_empty_prediction_is_all_false_negative():
    gt = empty()
    gt[2:4, 2:4, 2:4] = 1
    result = metrics.study_metrics(gt, empty(), VOXEL_ML)
    assert result["dice"] == 0.0
    assert result["fnv_ml"] == pytest.approx(8 * VOXEL_ML)
    assert result["fpv_ml"] == 0.0
    assert (result["tp_lesions"], result["fn_lesions"]) == (0, 1)


def test_one_overlapping_voxel_saves_the_whole_component():
    """A large predicted component overlapping a lesion by one voxel is neither FP nor FN."""
    gt, pred = empty(), empty()
    gt[2:4, 2:4, 2:4] = 1
    pred[3:8, 3:8, 3:8] = 1  # shares only voxel (3, 3, 3) with the lesion
    result = metrics.study_metrics(gt, pred, VOXEL_ML)
    assert result["fpv_ml"] == 0.0 and result["fnv_ml"] == 0.0
    assert result["dice"] == pytest.approx(2 * 1 / (8 + 125), abs=1e-12)
    assert (result["tp_lesions"], result["fn_lesions"], result["fp_lesions"]) == (1, 0, 0)


def test_face_contact_without_overlap_is_both_false_positive_and_false_negative():
    gt, pred = empty(), empty()
    gt[2:4, 2:4, 2:4] = 1
    pred[4:6, 2:4, 2:4] = 1  # touches the lesion's face but shares no voxel
    result = metrics.study_metrics(gt, pred, VOXEL_ML)
    assert result["dice"] == 0.0
    assert result["fpv_ml"] == pytest.approx(8 * VOXEL_ML)
    assert result["fnv_ml"] == pytest.approx(8 * VOXEL_ML)


@pytest.mark.parametrize(
    ("offset", "fp_voxels"),
    [
        ((1, 0, 0), {6: 0, 18: 0, 26: 0}),  # face neighbour: one component everywhere
        ((1, 1, 0), {6: 1, 18: 0, 26: 0}),  # edge neighbour: joined in 18 and 26
        ((1, 1, 1), {6: 1, 18: 1, 26: 0}),  # corner neighbour: joined only in 26
    ],
)
def test_predicted_neighbour_joins_the_hit_component_by_connectivity(offset, fp_voxels):
    gt, pred = empty(), empty()
    gt[5, 5, 5] = 1
    pred[5, 5, 5] = 1  # the hit
    pred[5 + offset[0], 5 + offset[1], 5 + offset[2]] = 1  # neighbour outside the lesion
    for connectivity, expected in fp_voxels.items():
        result = metrics.study_metrics(gt, pred, VOXEL_ML, connectivity=connectivity)
        assert result["fpv_ml"] == pytest.approx(expected * VOXEL_ML), connectivity
        assert result["fp_lesions"] == expected, connectivity


def test_diagonal_lesion_parts_are_two_lesions_in_18_but_one_in_26():
    gt, pred = empty(), empty()
    gt[4, 4, 4] = 1
    gt[5, 5, 5] = 1  # corner contact only
    pred[4, 4, 4] = 1
    official_result = metrics.study_metrics(gt, pred, VOXEL_ML)  # 18 by default
    assert official_result["fnv_ml"] == pytest.approx(VOXEL_ML)
    assert (official_result["tp_lesions"], official_result["fn_lesions"]) == (1, 1)
    joined = metrics.study_metrics(gt, pred, VOXEL_ML, connectivity=26)
    assert joined["fnv_ml"] == 0.0
    assert (joined["tp_lesions"], joined["fn_lesions"]) == (1, 0)


def test_several_components():
    """3 lesions (8, 1, 4 voxels); prediction: hits lesion 1 (+2 outside, joined), misses
    lesion 2, hits lesion 3 with 1 voxel, plus false positives of 6 and 2 voxels."""
    gt, pred = empty((16, 16, 16)), empty((16, 16, 16))
    gt[1:3, 1:3, 1:3] = 1
    gt[8, 8, 8] = 1
    gt[12, 2, 2:6] = 1
    pred[1:3, 1:3, 1:3] = 1
    pred[3, 1, 1:3] = 1  # face-joined to the hit on lesion 1
    pred[12, 2, 5] = 1
    pred[5:7, 12:15, 12] = 1  # FP, 6 voxels
    pred[14, 14, 0:2] = 1  # FP, 2 voxels
    result = metrics.study_metrics(gt, pred, VOXEL_ML)
    g, p, both = 13, 8 + 2 + 1 + 6 + 2, 8 + 1
    assert result["dice"] == pytest.approx(2 * both / (g + p), abs=1e-12)
    assert result["fpv_ml"] == pytest.approx(8 * VOXEL_ML)
    assert result["fnv_ml"] == pytest.approx(1 * VOXEL_ML)
    assert (result["tp_lesions"], result["fn_lesions"], result["fp_lesions"]) == (2, 1, 2)


def test_clinical_quantities_from_suv():
    gt, pred = empty(), empty()
    gt[2:4, 2:4, 2] = 1  # 4 voxels
    pred[2:4, 2, 2] = 1  # 2 of them
    suv = np.zeros(gt.shape, dtype=np.float32)
    suv[2, 2, 2], suv[3, 2, 2], suv[2, 3, 2], suv[3, 3, 2] = 10.0, 6.0, 4.0, 2.0
    result = metrics.study_metrics(gt, pred, VOXEL_ML, suv=suv)
    assert result["tlg_true"] == pytest.approx(22.0 * VOXEL_ML)  # SUVmean 5.5 x MTV 4 voxels
    assert result["tlg_pred"] == pytest.approx(16.0 * VOXEL_ML)
    assert (result["suvmax_true"], result["suvmax_pred"]) == (10.0, 10.0)


def test_non_binary_arrays_are_refused():
    gt = empty()
    with pytest.raises(ValueError, match=r"prediction is not binary .*\[2\]"):
        metrics.study_metrics(gt, gt + 2 * (np.arange(gt.size).reshape(gt.shape) == 7), 1.0)
    with pytest.raises(ValueError, match=r"prediction is not binary .*0\.5"):
        metrics.study_metrics(gt, np.full(gt.shape, 0.5), 1.0)


# ---- the official scripts, on random and hand-made volumes --------------------------------


def random_masks(rng, shape):
    """Blobby masks of varying density, like lesions: thresholded smoothed noise."""

    def blobs(level):
        field = ndi.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(0.6, 1.6))
        return (field > np.quantile(field, level)).astype(np.uint8)

    gt = blobs(rng.uniform(0.9, 0.995))
    pred = gt.copy() if rng.random() < 0.5 else blobs(rng.uniform(0.9, 0.995))
    # perturb: drop, shift and add speckles so that overlaps are partial
    pred = np.roll(pred, rng.integers(-2, 3, size=3), axis=(0, 1, 2))
    pred[rng.random(shape) < 0.01] = 1
    pred[rng.random(shape) < 0.2] = 0
    return gt, pred


def hand_made_cases():
    yield two_lesions_case()
    yield empty(), empty()
    gt = empty()
    gt[4, 4, 4] = gt[5, 5, 5] = 1
    yield gt, empty()
    pred = empty()
    pred[4, 4, 4] = pred[5, 5, 5] = pred[6, 6, 5] = 1
    yield gt, pred
    yield empty(), pred
    yield np.ones((6, 6, 6), np.uint8), np.ones((6, 6, 6), np.uint8)


def all_cases():
    rng = np.random.default_rng(20220)
    yield from hand_made_cases()
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(6, 28, size=3))
        yield random_masks(rng, shape)


def test_counts_match_the_official_scripts_exactly():
    n_components = 0
    for gt, pred in all_cases():
        counts = metrics.overlap_counts(gt, pred)
        assert counts["fp_voxels"] == official.false_pos_pix(gt, pred)
        assert counts["fn_voxels"] == official.false_neg_pix(gt, pred)
        n_components += counts["fp_lesions"] + counts["tp_lesions"] + counts["fn_lesions"]
    assert n_components > 500  # the random cases really have many components


def test_metrics_match_the_autopet_iii_functions_to_1e_9():
    voxel_ml = 0.0123456
    for gt, pred in all_cases():
        ours = metrics.study_metrics(gt, pred, voxel_ml)
        gt_f, pred_f = gt.astype(np.float64), pred.astype(np.float64)  # as get_fdata() gives
        dice = official.calc_dice_score(prediction=pred_f, ground_truth=gt_f)
        fp = official.count_false_positives(prediction=pred_f, ground_truth=gt_f)
        fn = official.count_false_negatives(prediction=pred_f, ground_truth=gt_f)
        np.testing.assert_allclose(ours["dice"], dice, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ours["fpv_ml"], fp * voxel_ml, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ours["fnv_ml"], fn * voxel_ml, rtol=0, atol=1e-9)
        if gt.any():  # 2022 script: same Dice where it is defined
            assert ours["dice"] == pytest.approx(official.dice_score(gt_f, pred_f), abs=1e-9)


def test_files_match_the_official_compute_metrics(tmp_path):
    """End to end from NIfTI files at an odd spacing. The official script multiplies by the
    float32 product of pixdim, we by the float64 product of the same float32 pixdim values:
    counts and Dice agree exactly, volumes to float32 precision."""
    rng = np.random.default_rng(7)
    spacing = (3.27, 2.0364201068878174, 2.0364201068878174)
    for i in range(6):
        gt, pred = random_masks(rng, (20, 24, 22))
        seg = write(tmp_path / f"SEG{i}.nii.gz", gt, spacing)
        prd = write(tmp_path / f"pred{i}.nii.gz", pred, spacing)
        suv = write(tmp_path / f"SUV{i}.nii.gz", np.ones(gt.shape), spacing, np.float32)
        ours = metrics.evaluate_study(f"S{i}", seg, suv, prd)
        dice, fpv, fnv = official.compute_metrics(seg, prd)
        assert ours["dice"] == pytest.approx(dice, abs=1e-9)
        assert ours["fpv_ml"] == pytest.approx(float(fpv), rel=1e-6, abs=1e-9)
        assert ours["fnv_ml"] == pytest.approx(float(fnv), rel=1e-6, abs=1e-9)
        _, official_voxel = official.nii2numpy(seg)
        assert metrics.header_voxel_ml(seg, f"S{i}") == pytest.approx(
            float(official_voxel), rel=1e-6
        )


# ---- files: evaluate_split and bad input ---------------------------------------------------


@pytest.fixture
def split_files(tmp_path):
    """Two studies: L1 with the two-lesion case, N1 without lesions and one FP voxel."""
    gt, pred = two_lesions_case()
    fp_only = empty()
    fp_only[6, 6, 6] = 1
    suv = np.arange(gt.size, dtype=np.float32).reshape(gt.shape) / 100
    paths = {"studies": ["L1", "N1"], "seg": [], "suv": [], "pred": []}
    for study, g, p in (("L1", gt, pred), ("N1", empty(), fp_only)):
        paths["seg"].append(write(tmp_path / "nifti" / study / "SEG.nii.gz", g))
        paths["suv"].append(write(tmp_path / "nifti" / study / "SUV.nii.gz", suv, dtype=np.float32))
        paths["pred"].append(write(tmp_path / "pred" / f"{study}.nii.gz", p))
    return paths


def run_split(paths, tmp_path, **changes):
    args = {
        "studies": paths["studies"],
        "seg_paths": paths["seg"],
        "suv_paths": paths["suv"],
        "pred_paths": paths["pred"],
        "per_study_csv": tmp_path / "out" / "test_per_study.csv",
        "summary_csv": tmp_path / "out" / "test_summary.csv",
        "settings": EvaluateSettings(connectivity=18),
    }
    args.update(changes)
    return metrics.evaluate_split(**args)


def test_evaluate_split_writes_per_study_and_summary(split_files, tmp_path):
    run_split(split_files, tmp_path)
    per_study = pd.read_csv(tmp_path / "out" / "test_per_study.csv")
    assert list(per_study.columns) == metrics.PER_STUDY_COLUMNS
    assert per_study["study"].tolist() == ["L1", "N1"]
    assert per_study["has_lesions"].tolist() == [True, False]
    lesion, none = per_study.iloc[0], per_study.iloc[1]
    assert lesion["dice"] == pytest.approx(0.4, abs=1e-12)
    assert lesion["fpv_ml"] == pytest.approx(3 * VOXEL_ML, rel=1e-6)
    assert math.isnan(none["dice"]) and math.isnan(none["fnv_ml"])
    assert none["fpv_ml"] == pytest.approx(VOXEL_ML, rel=1e-6)
    # SUV at voxel (6, 6, 6) of a 12^3 volume is its flat index / 100
    assert none["suvmax_pred"] == pytest.approx((6 * 144 + 6 * 12 + 6) / 100, rel=1e-6)

    summary = pd.read_csv(tmp_path / "out" / "test_summary.csv")
    assert len(summary) == 1
    row = summary.iloc[0]
    assert (row["n_studies"], row["n_lesion_studies"]) == (2, 1)
    assert row["dice"] == pytest.approx(0.4, abs=1e-12)  # only the lesion study
    assert row["fnv_ml"] == pytest.approx(5 * VOXEL_ML, rel=1e-6)
    assert row["fpv_ml"] == pytest.approx((3 + 1) * VOXEL_ML / 2, rel=1e-6)  # both studies
    assert row["fp_lesions"] == pytest.approx(1.0)


def test_missing_prediction_names_the_study(split_files, tmp_path):
    split_files["pred"][1].unlink()
    with pytest.raises(StudyError, match=r"study N1, file .*N1\.nii\.gz: prediction is missing"):
        run_split(split_files, tmp_path)
    assert not (tmp_path / "out" / "test_per_study.csv").exists()


def test_prediction_on_another_grid_is_refused(split_files, tmp_path):
    write(split_files["pred"][0], np.zeros((12, 12, 13), np.uint8))
    with pytest.raises(StudyError, match=r"study L1, .*prediction shape \(12, 12, 13\)"):
        run_split(split_files, tmp_path)
    write(split_files["pred"][0], empty(), spacing=(3.0, 2.0, 1.6))
    with pytest.raises(StudyError, match=r"study L1, .*prediction affine differs from SEG"):
        run_split(split_files, tmp_path)


def test_non_binary_prediction_file_is_refused(split_files, tmp_path):
    labels = empty()
    labels[1, 1, 1] = 2
    write(split_files["pred"][1], labels)
    with pytest.raises(StudyError, match=r"study N1, file .*N1\.nii\.gz: prediction is not binary"):
        run_split(split_files, tmp_path)


def test_misaligned_lists_are_refused(split_files, tmp_path):
    with pytest.raises(ValueError, match="must be aligned"):
        run_split(split_files, tmp_path, pred_paths=split_files["pred"][:1])


def test_header_voxel_volume_is_read_from_pixdim(tmp_path):
    path = write(tmp_path / "a.nii.gz", empty(), spacing=(3.0, 2.0364201068878174, 2.04))
    pixdim = nib.load(path).header["pixdim"]
    assert metrics.header_voxel_ml(path, "a") == float(
        np.float64(pixdim[1]) * np.float64(pixdim[2]) * np.float64(pixdim[3]) / 1000
    )
