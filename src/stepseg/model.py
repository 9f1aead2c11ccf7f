"""The network factory: one MONAI UNet, described by plain settings so a checkpoint can rebuild it.

The paper uses MONAI's `UNet` with PET and CT as inputs, 8 outputs, 5 levels with channels
(96, 192, 384, 768, 1536) and 4 residual units; the authors' released code uses channels
(96, 192, 192, 192, 192), batch normalisation and a third, all-zero input channel. The spec is kept
as plain types (ints, lists, strings) so it can be stored in `model.pt` and read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn

from stepseg.atomic import atomic_file

MODEL_FORMAT = "stepseg-model-1"
# Keys every model.pt holds besides what `save` is given (see `train.save_model`).
REQUIRED_KEYS = ("format", "state_dict", "network", "patch_size", "zero_input_channel")


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


def network_inputs(image: torch.Tensor, zero_input_channel: bool) -> torch.Tensor:
    """[PET, CT] plus, for the released-code recipe, the all-zero third channel."""
    if not zero_input_channel:
        return image
    return torch.cat([image, torch.zeros_like(image[:, :1])], dim=1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` (or None) picks CUDA when present, otherwise CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); None on CPU or `amp: off`."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def save(path: str | Path, net: nn.Module, spec: NetworkSpec, info: Mapping[str, Any]) -> None:
    """Write weights, the spec and `info` (plain types only) atomically to `path`.

    Plain types (no pickled classes) let every reader use `torch.load(weights_only=True)`.
    """
    checkpoint = {
        **info,
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "network": spec.to_dict(),
    }
    save_atomic(checkpoint, path)


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file renamed onto `path`, byte-identical for identical `obj`.

    Saved to a path, torch names the archive's root folder after the file, i.e. after the random
    temporary name; saved to an open file it is always "archive".
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def load(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of `model.pt` in eval mode; a foreign or mismatched file is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable stepseg model file ({exc})") from exc
    if not isinstance(checkpoint, dict):
        checkpoint = {}
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing or checkpoint["format"] != MODEL_FORMAT:
        raise ValueError(
            f"{path} is not a {MODEL_FORMAT} model file (missing keys {missing}, "
            f"format {checkpoint.get('format')!r})"
        )
    net = build(NetworkSpec.from_dict(checkpoint["network"]))
    expected = net.state_dict()
    weights = checkpoint["state_dict"]
    missing_weights = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in weights if k in expected and weights[k].shape != expected[k].shape]
    if missing_weights or unexpected or reshaped:
        raise ValueError(
            f"{path}: weights do not fit the network its config describes "
            f"({len(missing_weights)} missing, {len(unexpected)} unexpected, "
            f"{len(reshaped)} of another shape); the file was written by another config"
        )
    net.load_state_dict(weights)
    return net.to(device).eval(), checkpoint


def init_mask_prior(net: nn.Module, prior: float) -> None:
    """Start the mask channel at probability `prior` (bias = logit(prior) on the last conv).

    The focal-loss initialisation of Lin et al. (2017): with lesions under 1 % of the voxels, an
    output starting at 0.5 everywhere gives Dice gradients near zero, and short trainings stall.
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"mask prior must be in (0, 1), got {prior}")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    last = convs[-1]
    if last.bias is None:
        raise ValueError("the network's last convolution has no bias to initialise")
    with torch.no_grad():
        last.bias[0] = math.log(prior / (1.0 - prior))
