"""The network factory: one MONAI UNet, described by plain settings so a checkpoint can rebuild it.

The paper uses MONAI's `UNet` with PET and CT as inputs, 8 outputs, 5 levels with channels
(96, 192, 384, 768, 1536) and 4 residual units; the authors' released code uses channels
(96, 192, 192, 192, 192), batch normalisation and a third, all-zero input channel. The spec is kept
as plain types (ints, lists, strings) so it can be stored in `model.pt` and read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from monai.networks.nets import UNet
from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    """Everything needed to rebuild the network; `in_channels` includes any all-zero channel."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    num_res_units: int
    norm: str
    dropout: float = 0.0

    @property
    def strides(self) -> tuple[int, ...]:
        """Every level halves each axis, so a patch axis must be divisible by 2**(levels-1)."""
        return (2,) * (len(self.channels) - 1)

    @property
    def divisor(self) -> int:
        return 2 ** len(self.strides)

    def to_dict(self) -> dict[str, Any]:
        spec = asdict(self)
        spec["channels"] = list(self.channels)
        return spec

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> NetworkSpec:
        return cls(
            in_channels=int(spec["in_channels"]),
            out_channels=int(spec["out_channels"]),
            channels=tuple(int(c) for c in spec["channels"]),
            num_res_units=int(spec["num_res_units"]),
            norm=str(spec["norm"]),
            dropout=float(spec.get("dropout", 0.0)),
        )


def network_spec(settings: Mapping[str, Any], out_channels: int, in_channels: int) -> NetworkSpec:
    """The spec from merged train settings (`channels`, `num_res_units`, `norm`, `dropout`)."""
    channels: Sequence[int] = settings["channels"]
    if len(channels) < 2:
        raise ValueError(f"train.channels needs at least 2 levels, got {list(channels)}")
    return NetworkSpec(
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(int(c) for c in channels),
        num_res_units=int(settings["num_res_units"]),
        norm=str(settings["norm"]),
        dropout=float(settings.get("dropout", 0.0)),
    )


def build(spec: NetworkSpec) -> nn.Module:
    """A 3-D MONAI UNet with stride-2 levels."""
    return UNet(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=spec.channels,
        strides=spec.strides,
        num_res_units=spec.num_res_units,
        norm=spec.norm,
        dropout=spec.dropout,
    )


def check_patch_size(patch_size: Sequence[int], spec: NetworkSpec) -> None:
    """Refuse patch sizes the UNet cannot halve at every level (MONAI would fail on a concat)."""
    bad = [p for p in patch_size if p % spec.divisor]
    if bad:
        raise ValueError(
            f"patch_size {list(patch_size)} (z, y, x) must be divisible by {spec.divisor} "
            f"for a UNet with {len(spec.channels)} levels"
        )
