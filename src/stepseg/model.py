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
from stepseg.names import ORIENTATION
from stepseg.settings import TrainSettings

MODEL_FORMAT = "stepseg-model-2"
# Keys every model.pt holds (see `save`).
REQUIRED_KEYS = ("format", "state_dict", "network", "settings", "target_preset")
# The orientation of a model.pt written before `save` recorded one: such models were trained on
# stepseg's own conversions, which wrote LPS then as now.
UNRECORDED_ORIENTATION = "LPS"


@dataclass(frozen=True, kw_only=True)
class NetworkSpec:
    """Everything needed to rebuild the network; `in_channels` includes any all-zero channel."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    num_res_units: int
    norm: str
    dropout: float
    mask_head: str

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
            dropout=float(spec["dropout"]),
            mask_head=str(spec["mask_head"]),
        )


MASK_HEADS = ("shared", "separate")


def network_spec(settings: TrainSettings, out_channels: int) -> NetworkSpec:
    """The network of a variant's settings with `out_channels` outputs; the released code's
    recipe adds an all-zero third input channel (`zero_input_channel`)."""
    if len(settings.channels) < 2:
        raise ValueError(f"train.channels needs at least 2 levels, got {list(settings.channels)}")
    return NetworkSpec(
        in_channels=3 if settings.zero_input_channel else 2,
        out_channels=out_channels,
        channels=settings.channels,
        num_res_units=settings.num_res_units,
        norm=settings.norm,
        dropout=settings.dropout,
        mask_head=settings.mask_head,
    )


class SeparateHeads(nn.Module):
    """A UNet ending in `channels[0]` features, then its own 1x1x1 convolution for the mask and
    one for the auxiliary channels: MONAI's UNet computes every output channel with one last
    layer, so the seven regression targets shape the features the mask logit is read from."""

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        features = spec.channels[0]
        self.body = _unet(spec, out_channels=features)
        self.act = nn.PReLU()
        self.mask = nn.Conv3d(features, 1, kernel_size=1)
        self.aux = nn.Conv3d(features, spec.out_channels - 1, 1) if spec.out_channels > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.act(self.body(x))
        if self.aux is None:
            return self.mask(shared)
        return torch.cat([self.mask(shared), self.aux(shared)], dim=1)


def _unet(spec: NetworkSpec, out_channels: int) -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=out_channels,
        channels=spec.channels,
        strides=spec.strides,
        num_res_units=spec.num_res_units,
        norm=spec.norm,
        dropout=spec.dropout,
    )


def build(spec: NetworkSpec) -> nn.Module:
    """A 3-D MONAI UNet with stride-2 levels; `mask_head: separate` adds 1x1x1 heads."""
    if spec.mask_head not in MASK_HEADS:
        raise ValueError(f"unknown mask_head {spec.mask_head!r}; expected one of {MASK_HEADS}")
    if spec.mask_head == "separate":
        return SeparateHeads(spec)
    return _unet(spec, spec.out_channels)


def last_shared_layer(net: nn.Module) -> nn.Module:
    """The module whose output is the last feature map every output channel is computed from
    (its output for `SeparateHeads`, the input of the UNet's top up-sampling block otherwise;
    `train` logs each loss term's gradient there)."""
    if isinstance(net, SeparateHeads):
        return net.act
    return net.model[1]  # the UNet's skip connection: (input features, decoder output) concat


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


AMP_MODES = ("auto", "bf16", "fp16", "off")


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX): then bf16 autocast runs the
    default UNet's training step 1.3x faster than float32 (1.9x together with channels_last_3d,
    bench/train_step.py); emulated bf16 would be slower."""
    mkldnn = torch.backends.mkldnn
    return bool(mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cuda_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA card of this compute capability runs bf16 natively: from 8.0 (Ampere) on.

    Not `torch.cuda.is_bf16_supported()`: torch 2.13 says True on Volta (7.0) and Turing (7.5)
    too, where bf16 is emulated and slower than fp16 with a GradScaler.
    """
    return tuple(capability) >= (8, 0)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of `amp` on `device` (`choose_autocast` for it); None = float32."""
    if device.type == "cuda":
        native_bf16 = cuda_native_bf16(torch.cuda.get_device_capability(device))
    else:
        native_bf16 = device.type == "cpu" and cpu_supports_bf16()
    return choose_autocast(device.type, amp, native_bf16)


def choose_autocast(device_type: str, amp: str, native_bf16: bool) -> torch.dtype | None:
    """The autocast dtype of `amp` on a device of `device_type` that does (not) run bf16 natively
    (CUDA: `cuda_native_bf16`; CPU: `cpu_supports_bf16`); None = float32.

    `auto`: native bf16 where the device has it; else fp16 on CUDA (train.py scales its gradients
    with a GradScaler) and float32 on a CPU. `bf16` on CUDA is taken as asked, emulated or not;
    `bf16` on a CPU without native bf16 and `fp16` on a CPU are refused (CPU autocast has no fp16
    gradient scaling), so a setting never silently differs.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp {amp!r} is not one of {AMP_MODES}")
    if amp == "off":
        return None
    if device_type == "cuda":
        if amp == "bf16" or (amp == "auto" and native_bf16):
            return torch.bfloat16
        return torch.float16
    if device_type != "cpu":
        return None
    if amp == "fp16":
        raise ValueError("amp fp16 needs a CUDA device; on a CPU use bf16, auto or off")
    if native_bf16:
        return torch.bfloat16
    if amp == "bf16":
        raise ValueError(
            "amp bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); use auto or off"
        )
    return None


def autotune_convolutions(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms for each new input shape and keep the
    fastest (`cudnn.benchmark`): training patches and inference windows (the training patch) come
    in one shape per batch size, so a process pays the timing once per shape. A CPU has no cuDNN.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last_3d on a CPU, where oneDNN's 3-D convolutions run faster in it (the default
    UNet's training step: float32 1.42x, bf16 1.43x, bench/train_step.py); the default layout
    elsewhere (not measured on a GPU)."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


@dataclass(frozen=True)
class ModelInfo:
    """What `model.pt` says besides its weights: the variant's settings as trained (the same
    `TrainSettings` the train job read), its network and its target preset (`Preset.to_dict`)."""

    settings: TrainSettings
    network: NetworkSpec
    target_preset: dict[str, Any]


def save(path: str | Path, net: nn.Module, info: ModelInfo) -> None:
    """Write weights, settings, network, target preset and orientation atomically to `path`.

    Plain types (no pickled classes) let every reader use `torch.load(weights_only=True)`.
    """
    checkpoint = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "network": info.network.to_dict(),
        "settings": info.settings.to_dict(),
        "target_preset": info.target_preset,
        "orientation": ORIENTATION,  # of the arrays it was trained on (pack stores them so)
    }
    save_atomic(checkpoint, path)


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file renamed onto `path`, byte-identical for identical `obj`.

    Saved to a path, torch names the archive's root folder after the file, i.e. after the random
    temporary name; saved to an open file it is always "archive".
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def load(path: str | Path, device: torch.device) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the network of `model.pt` in eval mode; a foreign or mismatched file (another
    network, another orientation) is named."""
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
    orientation = checkpoint.get("orientation", UNRECORDED_ORIENTATION)
    if orientation != ORIENTATION:
        raise ValueError(
            f"{path} was trained on images in {orientation} orientation, but this stepseg "
            f"brings every image to {ORIENTATION}: the network would see its inputs flipped or "
            "transposed; retrain it with this version"
        )
    info = ModelInfo(
        settings=TrainSettings.from_stored(checkpoint["settings"], f"{path}: train"),
        network=NetworkSpec.from_dict(checkpoint["network"]),
        target_preset=checkpoint["target_preset"],
    )
    net = build(info.network)
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
    return net.to(device, memory_format=memory_format(device)).eval(), info


def init_mask_prior(net: nn.Module, prior: float) -> None:
    """Start the mask channel at probability `prior` (bias = logit(prior) on the last conv).

    The focal-loss initialisation of Lin et al. (2017): with lesions under 1 % of the voxels, an
    output starting at 0.5 everywhere gives Dice gradients near zero, and short trainings stall.
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"mask prior must be in (0, 1), got {prior}")
    if isinstance(net, SeparateHeads):
        last = net.mask
    else:
        convs = [m for m in net.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
        last = convs[-1]
    if last.bias is None:
        raise ValueError("the network's last convolution has no bias to initialise")
    with torch.no_grad():
        last.bias[0] = math.log(prior / (1.0 - prior))
