"""The lesion-presence gate (stepseg.gate, and its part of stepseg.infer): the whole-crop channel's
window factor, component presence, the threshold chosen out of fold, the gate job's files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stepseg import gate, infer, model, names, nifti, normalize, presets
from stepseg.errors import StudyError
from stepseg.settings import InferSettings, TrainSettings

AFFINE = np.diag([-2.0, -2.0, 2.0, 1.0])  # LPS: arrays load back as written


def test_both_presets_whole_crop_channels_are_found_and_a_schedule_without_one_has_none():
    assert gate.whole_crop_channel(presets.PAPER) == (7, "ct")
    assert gate.whole_crop_channel(presets.RELEASED_CODE) == (6, "ct")
    without_whole = presets.Preset(
        name="finite", steps=presets.PAPER.steps[:-1], channels=presets.PAPER.channels[:7]
    )
    assert gate.whole_crop_channel(without_whole) is None


def test_a_window_presence_is_the_least_squares_factor_on_the_fill():
    """Window 0 predicts 0.8 x its CT fill, window 1 0.1 x, window 2 has no CT at all (air)."""
    rng = np.random.default_rng(0)
    inputs = torch.from_numpy(rng.uniform(0.2, 1.0, (3, 2, 4, 5, 6)).astype(np.float32))
    inputs[2, 1] = 0.0
    whole = torch.stack([0.8 * inputs[0, 1:], 0.1 * inputs[1, 1:], inputs[2, 1:] + 0.5])
    factor = infer.window_presence(whole, inputs, "ct")
    np.testing.assert_allclose(factor.numpy(), [0.8, 0.1, 0.0], atol=1e-6)
    # against the PET fill the same outputs give other factors
    pet = inputs[:, :1]
    expected = (whole * pet).sum(dim=(1, 2, 3, 4)) / pet.square().sum(dim=(1, 2, 3, 4))
    np.testing.assert_allclose(
        infer.window_presence(whole, inputs, "pet").numpy(), expected.numpy(), rtol=1e-6
    )


def test_each_component_holds_the_mean_presence_over_its_voxels():
    mask = np.zeros((6, 8, 8), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # component A, 8 voxels
    mask[4, 6, 6] = 1  # component B, 1 voxel
    presence = np.zeros(mask.shape, np.float32)
    presence[1:3, 1:3, 1:3] = np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 10  # mean 0.35
    presence[4, 6, 6] = 0.9
    presence[0, 0, 0] = 5.0  # outside the mask: ignored
    scores = gate.component_presence(mask, presence)
    np.testing.assert_allclose(scores[1:3, 1:3, 1:3], 0.35, rtol=1e-6)
    assert scores[4, 6, 6] == pytest.approx(0.9)
    assert np.count_nonzero(scores) == 9
    np.testing.assert_array_equal(gate.apply(mask, scores, 0.5), (scores > 0.5).astype(np.uint8))
    assert gate.apply(mask, scores, 0.35).sum() == 9  # at the threshold: kept


def _study(seg_boxes, pred_boxes, shape=(8, 16, 16)):
    """SEG and prediction masks and the component presence map: `pred_boxes` are (box,
    presence) pairs, one component each."""
    seg = np.zeros(shape, np.uint8)
    for box in seg_boxes:
        seg[box] = 1
    pred = np.zeros(shape, np.uint8)
    presence = np.zeros(shape, np.float32)
    for box, value in pred_boxes:
        pred[box] = 1
        presence[box] = value
    return seg, pred, gate.component_presence(pred, presence)


LESION = np.s_[2:4, 2:6, 2:6]  # 32 voxels
FAR = np.s_[5:7, 10:14, 10:14]  # 32 voxels, away from the lesion
SMALL = np.s_[1:2, 12:14, 1:3]  # 4 voxels


def _curves(*studies):
    return [
        gate.study_curve(f"S{i}", seg, pred, scores, voxel_ml=0.5)
        for i, (seg, pred, scores) in enumerate(studies)
    ]


def test_the_threshold_removes_the_most_fpv_at_no_cost_in_dice_between_presence_levels():
    """A lesion-free study with one false positive (presence 0.2), a lesion study whose lesion is
    found (0.8) beside a false positive (0.3): gating between 0.3 and 0.8 drops both false
    positives and keeps the lesion; the chosen threshold is the midpoint 0.55. Dropping
    everything (+inf) has no FPV either but loses the lesion's Dice."""
    curves = _curves(
        _study([], [(FAR, 0.2)]),
        _study([LESION], [(LESION, 0.8), (SMALL, 0.3)]),
    )
    threshold, curve = gate.choose_threshold(curves)
    assert threshold == pytest.approx(0.55)
    by_threshold = {point["threshold"]: point for point in curve}
    assert list(by_threshold) == pytest.approx([-math.inf, 0.25, 0.55, math.inf])
    ungated = by_threshold[-math.inf]
    assert ungated["fpv_ml"] == pytest.approx((32 * 0.5 + 4 * 0.5) / 2)  # 9 ml
    assert ungated["fnv_ml"] == 0.0
    assert ungated["dice"] == pytest.approx(2 * 32 / (32 + 36))
    assert curve[1]["lesion_free_empty"] == 1.0  # at 0.25
    best = gate.objective(curves, threshold)
    assert (best["fpv_ml"], best["fnv_ml"], best["dice"]) == (0.0, 0.0, 1.0)
    everything = by_threshold[math.inf]
    assert (everything["fpv_ml"], everything["dice"]) == (0.0, 0.0)
    assert everything["fnv_ml"] == pytest.approx(16.0)  # the lesion lost


def test_a_gate_that_would_drop_found_lesions_stays_off():
    """The found lesions have the lowest presence: any threshold that drops a false positive
    drops a lesion first and costs Dice, so the gate drops nothing (-inf)."""
    curves = _curves(
        _study([], [(SMALL, 0.6)]),
        _study([LESION], [(LESION, 0.1), (SMALL, 0.5)]),
        _study([LESION], [(LESION, 0.2)]),
    )
    threshold, _ = gate.choose_threshold(curves)
    assert threshold == -math.inf


def test_each_fold_is_gated_with_the_threshold_chosen_on_the_other_folds():
    """Fold 0 alone would drop its false positive at 0.7 (> its lesion's presence 0.6 and
    lesion-free studies elsewhere say so too); fold 1's lesion has presence 0.4 and a lesion-free
    false positive at 0.5: each fold gets the other's choice, never its own."""
    fold0 = [
        _study([LESION], [(LESION, 0.9), (SMALL, 0.7)]),
    ]
    fold1 = [
        _study([LESION], [(LESION, 0.4)]),
        _study([], [(FAR, 0.3)]),
    ]
    curves = _curves(*fold0, *fold1)
    chosen = gate.cross_fitted_thresholds(curves, [0, 1, 1])
    own0, _ = gate.choose_threshold(curves[:1])
    own1, _ = gate.choose_threshold(curves[1:])
    assert own0 == pytest.approx(0.8)  # between its false positive 0.7 and lesion 0.9
    assert own1 == pytest.approx(0.35)  # between its false positive 0.3 and lesion 0.4
    assert chosen == {0: pytest.approx(own1), 1: pytest.approx(own0)}
    # one fold (a val split): its own choice, in sample
    assert gate.cross_fitted_thresholds(curves, [0, 0, 0]) == {0: gate.choose_threshold(curves)[0]}


def _write_prediction(folder, study, pred, scores):
    nifti.save(nifti.Volume(pred, AFFINE), folder / f"{study}.nii.gz")
    nifti.save(nifti.Volume(scores, AFFINE), gate.presence_path(folder / f"{study}.nii.gz"))


def test_the_gate_job_writes_cross_fitted_gated_masks_and_its_record(tmp_path):
    studies = {
        "A_1": (0, _study([LESION], [(LESION, 0.9), (SMALL, 0.7)])),
        "B_1": (1, _study([LESION], [(LESION, 0.4)])),
        "C_1": (1, _study([], [(FAR, 0.3)])),
    }
    chunk = tmp_path / "pred" / "oof" / "fold0-chunk-0"
    chunk.mkdir(parents=True)
    selection = []
    for study, (fold, (seg, pred, scores)) in studies.items():
        _write_prediction(chunk, study, pred, scores)
        nifti.save(nifti.Volume(seg, AFFINE), tmp_path / study / "SEG.nii.gz")
        selection.append((study, chunk / f"{study}.nii.gz", tmp_path / study / "SEG.nii.gz", fold))
    test_dir = tmp_path / "pred" / "test"
    test_dir.mkdir()
    _, test_pred, test_scores = _study([], [(LESION, 0.6), (FAR, 0.5)])
    _write_prediction(test_dir, "T_1", test_pred, test_scores)

    out = tmp_path / "gated"
    threshold = gate.gate_predictions(
        selection={"oof": selection},
        test=[("T_1", test_dir / "T_1.nii.gz")],
        out_dir=out,
        record_path=tmp_path / "gate.json",
    )
    record = gate.read_choice(tmp_path / "gate.json")
    assert record["threshold"] == pytest.approx(threshold)
    assert record["selection_split"] == "oof"
    fold_thresholds = {int(k): v for k, v in record["fold_thresholds"].items()}
    assert fold_thresholds == {0: pytest.approx(0.35), 1: pytest.approx(0.8)}
    # A (fold 0) at 0.35 keeps both components; B (fold 1) at 0.8 loses its lesion
    a = nifti.load(out / "oof" / "A_1.nii.gz", "A_1").array
    np.testing.assert_array_equal(a, studies["A_1"][1][1])
    assert nifti.load(out / "oof" / "B_1.nii.gz", "B_1").array.sum() == 0
    assert nifti.load(out / "oof" / "C_1.nii.gz", "C_1").array.sum() == 0
    # test: gated with the threshold chosen on all three (drops C's 0.3 and A's 0.7, keeps 0.9
    # and B's 0.4 at the midpoint 0.35)
    assert threshold == pytest.approx(0.35)
    t = nifti.load(out / "test" / "T_1.nii.gz", "T_1").array
    np.testing.assert_array_equal(t, test_pred)
    assert json.loads((tmp_path / "gate.json").read_text())["objective"].startswith(
        "the lowest mean FPV"
    )


def test_a_prediction_without_a_presence_map_is_named(tmp_path):
    seg, pred, _ = _study([LESION], [(LESION, 0.9)])
    nifti.save(nifti.Volume(pred, AFFINE), tmp_path / "P_1.nii.gz")
    nifti.save(nifti.Volume(seg, AFFINE), tmp_path / "SEG.nii.gz")
    with pytest.raises(StudyError, match=r"study P_1, file .*P_1\.presence\.nii\.gz: no lesion"):
        gate.gate_predictions(
            selection={"oof": [("P_1", tmp_path / "P_1.nii.gz", tmp_path / "SEG.nii.gz", 0)]},
            test=[],
            out_dir=tmp_path / "out",
            record_path=tmp_path / "gate.json",
        )
    assert not (tmp_path / "gate.json").exists()


def test_presence_files_sit_beside_their_masks():
    assert gate.presence_path("a/S_1.nii.gz").as_posix() == "a/S_1.presence.nii.gz"
    assert gate.presence_path("out/case.mha").as_posix() == "out/case.presence.mha"


def test_a_gated_variant_is_named_after_its_model():
    assert names.gated_name("stepwise-seed3") == "stepwise_gated-seed3"
    assert names.parse_trained(names.gated_name("alpha-seed0")) == ("alpha_gated", 0)
    with pytest.raises(ValueError, match="threshold is not a trained model"):
        names.gated_name("threshold")


PATCH = [8, 16, 16]


def _model(path, targets):
    settings = TrainSettings.for_variant(
        {"channels": [4, 8], "num_res_units": 1, "patch_size": PATCH, "targets": targets}
    )
    info = model.ModelInfo(
        settings=settings,
        network=model.network_spec(settings, out_channels=8 if targets == "stepwise" else 1),
        target_preset=presets.PAPER.to_dict(),
    )
    torch.manual_seed(0)
    net = model.build(info.network)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save(path, net, info)
    return net.eval(), info


def test_inference_gives_each_component_its_windows_presence(tmp_path):
    """One window covers the volume: every predicted component's presence is that window's
    least-squares factor of channel 7 on the normalised CT, computed from the network here; the
    mask is the one without the presence channel. A plain model gives no presence."""
    net, info = _model(tmp_path / "stepwise.pt", "stepwise")
    rng = np.random.default_rng(1)
    suv = rng.gamma(2.0, 1.0, PATCH).astype(np.float32)
    ct = rng.normal(0, 300, PATCH).astype(np.float32)
    settings = InferSettings(amp="off")
    cpu = torch.device("cpu")
    prediction = infer.predict([(net, info)], suv, ct, settings, cpu)
    x = normalize.normalize_batch(
        torch.from_numpy(suv)[None, None], torch.from_numpy(ct)[None, None]
    )
    with torch.no_grad():
        out = net(x)
    ct_fill = x[:, 1:]
    expected = float((out[:, 7:8] * ct_fill).sum() / ct_fill.square().sum())
    probability = torch.sigmoid(out[0, 0]).numpy()
    np.testing.assert_array_equal(prediction.mask, (probability >= 0.5).astype(np.uint8))
    assert 0 < prediction.mask.sum() < prediction.mask.size
    on_mask = prediction.presence[prediction.mask > 0]
    np.testing.assert_allclose(on_mask, expected, rtol=1e-4)
    assert not prediction.presence[prediction.mask == 0].any()

    plain_net, plain_info = _model(tmp_path / "plain.pt", "plain")
    assert infer.predict([(plain_net, plain_info)], suv, ct, settings, cpu).presence is None
    files = infer.StudyFiles("S1", tmp_path / "SUV.nii.gz", tmp_path / "CTres.nii.gz",
                             tmp_path / "S1.nii.gz")  # fmt: skip
    nifti.save(nifti.Volume(suv, AFFINE), files.suv)
    nifti.save(nifti.Volume(np.clip(ct, -1000, 1000), AFFINE), files.ctres)
    with pytest.raises(ValueError, match=r"needs a trained whole-crop channel, which .*plain\.pt"):
        infer.predict_studies([tmp_path / "plain.pt"], [files], settings, gate_threshold=0.5)
