"""Typed settings of each stage: the one home of every default, built once from the config.

config/schema.yaml checks the config file's shape when Snakemake starts and holds no defaults;
these classes are what the package reads. Each is frozen and keyword-only, and `from_mapping`
refuses an unknown key, a missing key without a default, or a value of the wrong type, naming it
(`train.variants.plain.lr: expected a number, got 'fast'`): a setting from config.yaml, a variant's
overrides, a `model.pt` or a Python caller all meet the same checks.

The workflow passes each job `to_dict()` of its settings as `params` (plain types: Snakemake
compares them to decide reruns, and they are what `model.pt` stores); the job rebuilds the object
with `from_mapping`. Standard library only: the workflow imports this module before any job runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from stepseg import names


class SettingsError(ValueError):
    """A setting is unknown, missing or of the wrong type; the message names it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of the stage settings: checked construction from a mapping, plain-type export."""

    section: ClassVar[str]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str | None = None) -> Self:
        """The settings of `values`, checked key by key; `where` names them in errors."""
        where = where or cls.section
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SettingsError(
                f"{where}: unknown setting(s) {', '.join(unknown)}; expected some of "
                f"{', '.join(sorted(names))}"
            )
        hints = typing.get_type_hints(cls)
        checked = {}
        for field in dataclasses.fields(cls):
            if field.name in values:
                checked[field.name] = _checked(
                    values[field.name], hints[field.name], f"{where}.{field.name}"
                )
            elif field.default is dataclasses.MISSING:
                raise SettingsError(f"{where}.{field.name}: missing (it has no default)")
        return cls(**checked)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples): YAML, JSON, Snakemake params, `model.pt`."""
        return {key: _plain(value) for key, value in dataclasses.asdict(self).items()}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _checked(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotated type (ints accepted for floats, lists for tuples) or an error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (hint,) = (a for a in args if a is not type(None))
        return _checked(value, hint, where)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise SettingsError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise SettingsError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(
            _checked(v, a, f"{where}[{i}]")
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}
    raise SettingsError(f"{where}: expected {expected[hint]}, got {value!r}")


# --------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticSettings(Settings):
    """The embedded synthetic cohort (stepseg.synthetic): every key shapes the studies' bytes."""

    section: ClassVar[str] = "download.synthetic"
    seed: int
    n_patients: int
    repeat_fraction: float
    lesion_fraction: float
    pet_shape: tuple[int, int, int]
    pet_spacing_mm: tuple[float, float, float]
    ct_shape: tuple[int, int, int]
    ct_spacing_mm: tuple[float, float, float]
    pet_fwhm_mm: float = 6.5
    pet_noise: float = 0.12
    lesion_volume_ml: tuple[float, float] = (0.5, 60.0)
    lesions_per_study: tuple[int, int] = (1, 6)
    # CT stored outside its reconstruction circle, with PixelPaddingValue (names.CT_PADDING_HU);
    # None: the phantom everywhere
    ct_padding_hu: Literal[-3024, -2048] | None = None
    # SEG frames: one per PET slice, feet to head, as in the collection; or only lesion frames
    seg_layout: Literal["per_pet_slice", "lesion_frames"] = "per_pet_slice"

    def __post_init__(self) -> None:
        for key in ("lesion_volume_ml", "lesions_per_study"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise SettingsError(
                    f"download.synthetic.{key} must be [low, high] with 0 < low <= high"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TciaSettings(Settings):
    """The FDG-PET-CT-Lesions collection over TCIA's NBIA API (stepseg.sources.tcia)."""

    section: ClassVar[str] = "download.tcia"
    base_url: str
    collection: str
    patient_ids: tuple[str, ...] = ()
    limit: int = 0
    manifest_file: str = ""
    clinical_file: str = ""
    verify_md5: bool = False
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_s: float = 1.0
    cache_dir: str = "results/.partial/tcia"

    def __post_init__(self) -> None:
        if not self.base_url.endswith("/"):  # endpoints are joined onto it
            object.__setattr__(self, "base_url", self.base_url + "/")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DicomDirSettings(Settings):
    """A local DICOM tree in any folder layout (stepseg.sources.local)."""

    section: ClassVar[str] = "download.dicom_dir"
    path: str = ""
    # how the study's files reach results/raw/{study}
    link: Literal["symlink", "copy"] = "symlink"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiftiDirSettings(Settings):
    """The autoPET NIfTI release, <path>/<patient>/<study>/*.nii.gz (stepseg.sources.local)."""

    section: ClassVar[str] = "download.nifti_dir"
    path: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChecksSettings(Settings):
    """Inputs refused by convert, pack, infer and `stepseg predict` (stepseg.checks)."""

    section: ClassVar[str] = "checks"
    # air is -1000 HU (-1024 where scanners fill outside the field of view), dense bone and
    # contrast stay far below 4000; the padding values -3024 and -2048 (names.CT_PADDING_HU)
    # are always accepted, as air
    ct_hu_range: tuple[float, float] = (-1100.0, 4000.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertSettings(Settings):
    """DICOM -> NIfTI (stepseg.convert): the SUV decay reference and the CT resampling."""

    section: ClassVar[str] = "convert"
    suv_reference_time: Literal["acquisition", "series"] = "acquisition"
    ctres_interpolation: Literal["linear", "nearest"] = "linear"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackSettings(Settings):
    """The LMDB of one split (stepseg.pack)."""

    section: ClassVar[str] = "pack"
    codec: Literal["gzip", "bz2", "lzma"] | None = "gzip"
    level: int | None = None
    tile_shape: tuple[int, int, int] = (16, 64, 64)
    max_compressed_ratio: float = 0.05
    lesion_index_max: int = 4096
    hot_suv_min: float = 3.0
    hot_index_max: int = 4096


# --------------------------------------------------------------------------------------------
# training

Recipe = Literal["paper", "released_code"]

# What each recipe sets: the paper's description, or the authors' released code. A key the config
# sets wins; keys no recipe sets take the TrainSettings defaults.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "channels": [96, 192, 384, 768, 1536],
        "num_res_units": 4,
        "norm": "instance",
        "zero_input_channel": False,
        "lr": 3e-4,
        "weight_decay": 0.0,
        "batch_size": 16,
        "patch_size": [32, 160, 160],
        "schedule": "plateau_cosine",
        "epochs": 1000,
        "lambda_focal": 1.0,
        "mask_loss_scale": 1.0,
        "small_lesion_dice_weight": 0.0,
        "masked_mse": False,
    },
    "released_code": {
        "channels": [96, 192, 192, 192, 192],
        "num_res_units": 4,
        "norm": "batch",
        "zero_input_channel": True,
        "lr": 1.7e-4,
        "weight_decay": 4e-5,
        "batch_size": 8,
        "patch_size": [32, 160, 160],
        "schedule": "cosine",
        "epochs": 300,
        "lambda_focal": 2.0,
        "mask_loss_scale": 3.0,
        "small_lesion_dice_weight": 0.05,
        "masked_mse": True,
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings(Settings):
    """One trained variant: network, optimiser, schedule, loss, sampling and hardware.

    Build it with `for_variant`, which applies the recipe; the keys without a default here are
    the ones each recipe sets.
    """

    section: ClassVar[str] = "train"
    name: str = "model"
    seed: int = 0
    # stepwise: every channel of the target preset; plain: the lesion mask alone
    targets: Literal["stepwise", "plain"] = "stepwise"
    recipe: Recipe = "paper"
    # network (stepseg.model)
    channels: tuple[int, ...]
    num_res_units: int
    norm: Literal["instance", "batch"]
    dropout: float = 0.0
    zero_input_channel: bool
    mask_head: Literal["shared", "separate"] = "shared"
    # optimiser and schedule (stepseg.schedule)
    optimizer: Literal["adam"] = "adam"
    lr: float
    weight_decay: float
    batch_size: int
    patch_size: tuple[int, int, int]
    schedule: Literal["plateau_cosine", "cosine"]
    epochs: int
    plateau_window: int = 15
    plateau_factor: float = 2.5
    plateau_min_decrease: float = 5e-3
    restart_below_lr: float = 1e-5
    restart_lr: float = 1e-4
    cosine_epochs: int = 100
    # loss (stepseg.losses)
    lambda_dice: float = 1.0
    lambda_focal: float
    dice_batch: bool = False
    mask_prior: float = 0.0
    mask_loss_scale: float
    small_lesion_dice_weight: float
    masked_mse: bool
    loss_weighting: Literal["automatic", "fixed"] = "automatic"
    aux_loss_weight: float = 1.0
    # sampling (stepseg.data): the released code's jitter of lesion crops, fractions of the
    # half-patch (z, y, x): +-15 of 16 slices, randint(-s // 1.5, s // 1.5) in-plane
    crop_jitter: tuple[float, float, float] = (0.9375, 0.6667, 0.6667)
    samples_per_epoch: int = 0
    lesion_oversampling: float = 2.0
    lesion_centre_fraction: float = 0.5
    hot_centre_fraction: float = 0.0
    flips: bool = True
    val_every: int = 5
    val_samples: int = 32
    # hardware
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    num_workers: int = 0
    processes: int = 1

    def __post_init__(self) -> None:
        if self.device == "cpu" and self.amp == "fp16":
            # CPU autocast has no fp16 gradient scaling
            raise SettingsError(
                f"train variant {self.name}: amp fp16 needs a CUDA device; on a CPU use bf16, "
                "auto or off"
            )

    @property
    def trained_name(self) -> str:
        """`<variant>-seed<k>`: the folder under results/models/ and the report's row."""
        return names.trained_name(self.name, self.seed)

    @classmethod
    def for_variant(
        cls, train: Mapping[str, Any], variant: str | None = None, seed: int | None = None
    ) -> TrainSettings:
        """The settings of `variant` (a key of `train["variants"]`; None: the section alone)
        trained with `seed`: the recipe's values, then the section's keys, then the variant's."""
        where = cls.section
        merged = {key: value for key, value in train.items() if key != "variants"}
        if variant is not None:
            where = f"train.variants.{variant}"
            overrides = {k: v for k, v in train["variants"][variant].items() if k != "seeds"}
            merged.update(overrides, name=variant)
        if seed is not None:
            merged["seed"] = seed
        recipe = _checked(merged.get("recipe", "paper"), Recipe, f"{where}.recipe")
        return cls.from_mapping({**RECIPES[recipe], **merged}, where)


# --------------------------------------------------------------------------------------------
# inference and evaluation


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferSettings(Settings):
    """Whole-body sliding-window inference (stepseg.infer, `stepseg predict`)."""

    section: ClassVar[str] = "infer"
    # 0.5, not MONAI's 0.25: a window's edges see lesions worse than its centre
    overlap: float = 0.5
    flip_tta: bool = False
    sw_batch_size: int = 2
    threshold: float = 0.5
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThresholdSettings(Settings):
    """The SUV-threshold baseline (stepseg.threshold)."""

    section: ClassVar[str] = "threshold"
    suv: float = 4.0
    # the clinical 41 % SUVmax rule per component; 0 = off
    relative_to_max: float = 0.0
    min_volume_ml: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateSettings(Settings):
    """The autoPET metrics (stepseg.metrics)."""

    section: ClassVar[str] = "evaluate"
    # 18 = the official autoPET definition (cc3d)
    connectivity: Literal[6, 18, 26] = 18


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportSettings(Settings):
    """The results report (stepseg.report)."""

    section: ClassVar[str] = "report"
    mip_cases: tuple[Literal["best", "median", "worst"], ...] = ("best", "median", "worst")
    figure_dpi: int = 120
