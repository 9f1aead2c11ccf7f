"""Loss terms of the step-by-step recipe and their automatic weighting.

Channel 0 (the lesion mask) gets MONAI's DiceFocal loss; the auxiliary channels (dilated masks
filled with the input images) get MSE; `AutomaticWeightedLoss` (Liebel & Koerner 2018, in the form
the authors used: `sum_i 0.5 / s_i^2 * L_i + log(1 + s_i^2)`, `s` learned and initialised to 1)
balances them (`loss_weighting: automatic`, the published recipe), or `FixedWeights` gives the
mask term weight 1 and every auxiliary term `aux_loss_weight` (`loss_weighting: fixed`). The
released code adds, per auxiliary channel, a second MSE restricted to the channel's mask, and
0.05 x Dice on its "small lesion" region.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceFocalLoss, MaskedDiceLoss
from torch import nn

from stepseg.settings import TrainSettings

CHANNEL_LOSSES = ("dicefocal", "mse", "none")


class AutomaticWeightedLoss(nn.Module):
    """Learned weighting of several losses: `sum_i 0.5 / s_i^2 * L_i + log(1 + s_i^2)`."""

    def __init__(self, n_terms: int) -> None:
        super().__init__()
        if n_terms < 1:
            raise ValueError("AutomaticWeightedLoss needs at least one loss term")
        self.params = nn.Parameter(torch.ones(n_terms))

    def forward(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(losses) != self.params.numel():
            raise ValueError(f"expected {self.params.numel()} loss terms, got {len(losses)}")
        s2 = self.params.float() ** 2
        stacked = torch.stack([loss.float() for loss in losses])
        return (0.5 / s2 * stacked + torch.log1p(s2)).sum()

    def weights(self) -> list[float]:
        """The current s_i (logged every epoch: large s_i = a term the model gave up on)."""
        return [float(v) for v in self.params.detach().cpu()]

    def factors(self) -> torch.Tensor:
        """The factor each term is multiplied with now, 0.5 / s_i^2."""
        return (0.5 / self.params.detach().float() ** 2).cpu()


class FixedWeights(nn.Module):
    """`sum_i w_i * L_i` with constant weights (no parameters)."""

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.tensor([float(w) for w in weights]))

    def forward(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(losses) != self.fixed.numel():
            raise ValueError(f"expected {self.fixed.numel()} loss terms, got {len(losses)}")
        return (self.fixed * torch.stack([loss.float() for loss in losses])).sum()

    def weights(self) -> list[float]:
        return [float(v) for v in self.fixed.cpu()]

    def factors(self) -> torch.Tensor:
        return self.fixed.detach().float().cpu()


class StepwiseLoss(nn.Module):
    """All loss terms of one batch, combined by `AutomaticWeightedLoss`.

    `channel_losses[c]` is `dicefocal`, `mse` or `none` for output channel c (channel 0 must be
    `dicefocal`: it is the lesion mask that inference thresholds). From `settings`:
    `lambda_dice`, `lambda_focal`, `mask_loss_scale` (factor on channel 0's term before weighting),
    `small_lesion_dice_weight` (0 = off), `masked_mse` (second MSE inside each channel's mask),
    `dice_batch` (Dice over the whole batch instead of per patch: a lesion-free patch then no
    longer scores Dice loss 1 whatever the network does), `loss_weighting` (`automatic` or
    `fixed`) and `aux_loss_weight` (each auxiliary term's weight when fixed).
    """

    def __init__(self, channel_losses: Sequence[str], settings: TrainSettings) -> None:
        super().__init__()
        unknown = sorted(set(channel_losses) - set(CHANNEL_LOSSES))
        if unknown:
            raise ValueError(f"unknown channel loss {unknown}; expected one of {CHANNEL_LOSSES}")
        if not channel_losses or channel_losses[0] != "dicefocal":
            raise ValueError("channel 0 (the lesion mask) must use the dicefocal loss")
        self.channel_losses = list(channel_losses)
        self.mask_loss_scale = settings.mask_loss_scale
        self.small_lesion_dice_weight = settings.small_lesion_dice_weight
        self.masked_mse = settings.masked_mse
        self.dicefocal = DiceFocalLoss(
            sigmoid=True,
            lambda_dice=settings.lambda_dice,
            lambda_focal=settings.lambda_focal,
            batch=settings.dice_batch,
        )
        self.small_dice = MaskedDiceLoss(sigmoid=True)
        self.term_names = self._term_names()
        self.weighting: AutomaticWeightedLoss | FixedWeights
        if settings.loss_weighting == "automatic":
            self.weighting = AutomaticWeightedLoss(len(self.term_names))
        else:
            aux = settings.aux_loss_weight
            self.weighting = FixedWeights(
                [1.0 if name == "ch0_dicefocal" else aux for name in self.term_names]
            )

    def _term_names(self) -> list[str]:
        names = []
        for c, kind in enumerate(self.channel_losses):
            if kind == "dicefocal":
                names.append(f"ch{c}_dicefocal")
            elif kind == "mse":
                names.append(f"ch{c}_mse")
                if self.masked_mse:
                    names.append(f"ch{c}_mse_masked")
        return names

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        regions: torch.Tensor | None = None,
        small_lesions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (weighted total, unweighted terms by name) for logits and targets (B, C, D, H, W).

        `regions` (B, C, D, H, W) bool marks each channel's mask (needed by `masked_mse`);
        `small_lesions` (B, 1, D, H, W) marks voxels of small lesions (for the small-lesion Dice).
        """
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ"
            )
        logits = logits.float()
        terms: dict[str, torch.Tensor] = {}
        for c, kind in enumerate(self.channel_losses):
            out, ref = logits[:, c : c + 1], target[:, c : c + 1]
            if kind == "dicefocal":
                loss = self.dicefocal(out, ref)
                if c == 0 and self.small_lesion_dice_weight > 0 and small_lesions is not None:
                    terms["ch0_small_dice"] = self.small_dice(out, ref, small_lesions)
                    loss = loss + self.small_lesion_dice_weight * terms["ch0_small_dice"]
                terms[f"ch{c}_dicefocal"] = loss * (self.mask_loss_scale if c == 0 else 1.0)
            elif kind == "mse":
                terms[f"ch{c}_mse"] = torch.mean((out - ref) ** 2)
                if self.masked_mse:
                    terms[f"ch{c}_mse_masked"] = _masked_mse(out, ref, regions, c)
        total = self.weighting([terms[name] for name in self.term_names])
        return total, terms


def _masked_mse(
    out: torch.Tensor, ref: torch.Tensor, regions: torch.Tensor | None, channel: int
) -> torch.Tensor:
    """MSE inside the channel's mask; the whole patch when the batch has no mask voxel there."""
    if regions is None:
        raise ValueError("masked_mse needs the per-channel regions of the targets")
    inside = regions[:, channel : channel + 1].bool()
    if not bool(inside.any()):
        return torch.mean((out - ref) ** 2)
    return torch.mean((out[inside] - ref[inside]) ** 2)
