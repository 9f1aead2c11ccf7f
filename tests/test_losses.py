import math

import pytest
import torch
from monai.losses import DiceFocalLoss

from stepseg.losses import AutomaticWeightedLoss, StepwiseLoss
from stepseg.settings import TrainSettings

# the paper recipe: DiceFocal 1 + 1, automatic weighting, no masked MSE
PAPER = TrainSettings.for_variant({})


def test_automatic_weighting_matches_the_formula_at_init_and_after_change():
    awl = AutomaticWeightedLoss(3)
    terms = [torch.tensor(0.8), torch.tensor(0.2), torch.tensor(1.5)]
    expected = sum(0.5 * t.item() + math.log(2.0) for t in terms)
    assert awl(terms).item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        awl.params.copy_(torch.tensor([2.0, 0.5, 1.0]))
    expected = sum(
        0.5 / s**2 * t.item() + math.log(1 + s**2)
        for s, t in zip([2.0, 0.5, 1.0], terms, strict=True)
    )
    assert awl(terms).item() == pytest.approx(expected, rel=1e-6)
    assert awl.weights() == [2.0, 0.5, 1.0]


def test_automatic_weighting_learns_a_larger_s_for_a_larger_loss():
    awl = AutomaticWeightedLoss(2)
    optim = torch.optim.SGD(awl.parameters(), lr=0.05)
    for _ in range(200):
        optim.zero_grad()
        awl([torch.tensor(10.0), torch.tensor(0.01)]).backward()
        optim.step()
    big, small = awl.weights()
    # optimum of 0.5 L / s^2 + log(1 + s^2): s^2 = (L + sqrt(L^2 + 8 L)) / 4 (L=10: s ~ 2.4)
    assert big > 2.0
    assert small < 0.5


def test_term_count_is_checked():
    with pytest.raises(ValueError, match="expected 2 loss terms, got 1"):
        AutomaticWeightedLoss(2)([torch.tensor(1.0)])


def _batch(channels=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, channels, 4, 8, 8, generator=gen)
    target = torch.rand(2, channels, 4, 8, 8, generator=gen)
    target[:, 0] = (target[:, 0] > 0.7).float()
    return logits, target


def test_paper_terms_are_dicefocal_on_mask_and_mse_on_aux():
    loss = StepwiseLoss(["dicefocal", "mse", "mse", "none"], PAPER)
    logits, target = _batch()
    total, terms = loss(logits, target)
    assert list(terms) == ["ch0_dicefocal", "ch1_mse", "ch2_mse"]
    expected_df = DiceFocalLoss(sigmoid=True)(logits[:, :1], target[:, :1])
    assert terms["ch0_dicefocal"].item() == pytest.approx(expected_df.item(), rel=1e-6)
    mse = torch.mean((logits[:, 1:2] - target[:, 1:2]) ** 2)
    assert terms["ch1_mse"].item() == pytest.approx(mse.item(), rel=1e-6)
    # at init s = 1: total = sum(0.5 L) + n log 2 (channel 3 has no loss)
    expected = sum(0.5 * v.item() for v in terms.values()) + 3 * math.log(2.0)
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_released_code_terms_add_masked_mse_small_lesion_dice_and_scale():
    released = TrainSettings.for_variant({"recipe": "released_code"})
    loss = StepwiseLoss(["dicefocal", "dicefocal", "mse", "none"], released)
    logits, target = _batch()
    regions = torch.zeros_like(target, dtype=torch.bool)
    regions[:, 2, :, 2:6, 2:6] = True
    small = torch.zeros_like(target[:, :1], dtype=torch.bool)
    small[0, 0, 1:3, 1:4, 1:4] = True  # a small lesion's voxels in each patch
    small[1, 0, 2, 5:7, 2:5] = True
    _, terms = loss(logits, target, regions, small)
    assert loss.term_names == ["ch0_dicefocal", "ch1_dicefocal", "ch2_mse", "ch2_mse_masked"]
    df = DiceFocalLoss(sigmoid=True, lambda_focal=2.0)(logits[:, :1], target[:, :1])
    # soft Dice (smoothing 1e-5) of the mask channel inside the small-lesion voxels, per patch
    p = torch.sigmoid(logits[:, :1]) * small
    t = target[:, :1] * small
    assert 0 < float(t.sum()) < float(small.sum())  # lesion and background inside the mask
    axes = (1, 2, 3, 4)
    dice = (2 * (p * t).sum(axes) + 1e-5) / (p.sum(axes) + t.sum(axes) + 1e-5)
    small_dice = (1 - dice).mean()
    assert terms["ch0_small_dice"].item() == pytest.approx(small_dice.item(), rel=1e-6)
    expected = 3.0 * (df + 0.05 * small_dice)
    assert terms["ch0_dicefocal"].item() == pytest.approx(expected.item(), rel=1e-6)
    inside = regions[:, 2:3]
    masked = torch.mean((logits[:, 2:3][inside] - target[:, 2:3][inside]) ** 2)
    assert terms["ch2_mse_masked"].item() == pytest.approx(masked.item(), rel=1e-6)


def test_masked_mse_falls_back_to_whole_patch_without_mask_voxels():
    loss = StepwiseLoss(["dicefocal", "mse"], TrainSettings.for_variant({"masked_mse": True}))
    logits, target = _batch(channels=2)
    _, terms = loss(logits, target, torch.zeros_like(target, dtype=torch.bool))
    assert terms["ch1_mse_masked"].item() == pytest.approx(terms["ch1_mse"].item())


def test_plain_variant_is_one_dicefocal_term():
    loss = StepwiseLoss(["dicefocal"], PAPER)
    logits, target = _batch(channels=1)
    total, terms = loss(logits, target)
    assert list(terms) == ["ch0_dicefocal"]
    assert total.item() == pytest.approx(0.5 * terms["ch0_dicefocal"].item() + math.log(2.0))


def test_bad_channel_losses_are_refused():
    with pytest.raises(ValueError, match="channel 0"):
        StepwiseLoss(["mse", "dicefocal"], PAPER)
    with pytest.raises(ValueError, match="unknown channel loss"):
        StepwiseLoss(["dicefocal", "l1"], PAPER)
    with pytest.raises(ValueError, match=r"logits \(2, 2, 4, 8, 8\) and target"):
        StepwiseLoss(["dicefocal"], PAPER)(*_batch(channels=2)[:1], _batch(channels=1)[1])


def test_dice_batch_pools_the_dice_over_the_batch():
    logits, target = _batch(channels=1)
    target[1] = 0  # a lesion-free patch
    pooled = StepwiseLoss(["dicefocal"], TrainSettings.for_variant({"dice_batch": True}))(
        logits, target
    )[1]
    expected = DiceFocalLoss(sigmoid=True, batch=True)(logits, target)
    assert pooled["ch0_dicefocal"].item() == pytest.approx(expected.item(), rel=1e-6)
    per_patch = StepwiseLoss(["dicefocal"], PAPER)(logits, target)[1]
    assert per_patch["ch0_dicefocal"].item() != pytest.approx(expected.item(), rel=1e-3)
