"""Typed settings of each stage: the one home of every setting's type, default and allowed values.

These classes are what the package reads. config/schema.yaml, which Snakemake checks the config
file against when it starts, is generated from them (`make schema`: tools/schema.py >
config/schema.yaml; tests/test_settings.py fails when the committed file differs): a field's
annotation gives the type and enum, `Limits` in it the bounds, and a field without a default is
required (TrainSettings' are filled by the recipe instead). Each class is frozen and
keyword-only, and `from_mapping` refuses an unknown key, a missing key without a default, or a
value of the wrong type, naming it (`train.variants.plain.lr: expected a number, got 'fast'`): a
setting from config.yaml, a variant's overrides, a `model.pt` or a Python caller all meet the
same checks (the bounds are checked by the schema, at the workflow's start).

The workflow passes each job `to_dict()` of its settings as `params` (plain types: Snakemake
compares them to decide reruns, and they are what `model.pt` stores); the job rebuilds the object
with `from_mapping`. Standard library only: the workflow imports this module before any job runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self

from stepseg import names


class SettingsError(ValueError):
    """A setting is unknown, missing or of the wrong type; the message names it."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """JSON-schema keywords that narrow an annotated type (`Annotated[float, Limits(minimum=0)]`):
    bounds, lengths, patterns. config/schema.yaml gets them next to the type."""

    items: tuple[tuple[str, Any], ...]  # hashable, as typing needs `Annotated` metadata to be

    def __init__(self, **keywords: Any) -> None:
        object.__setattr__(self, "items", tuple(keywords.items()))


NonNegative = Annotated[float, Limits(minimum=0)]
Positive = Annotated[float, Limits(exclusiveMinimum=0)]
Fraction = Annotated[float, Limits(minimum=0, maximum=1)]
Count = Annotated[int, Limits(minimum=0)]
PositiveInt = Annotated[int, Limits(minimum=1)]
ZyxInt = tuple[PositiveInt, PositiveInt, PositiveInt]
ZyxMm = tuple[Positive, Positive, Positive]
Amp = Literal["auto", "bf16", "fp16", "off"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of the stage settings: checked construction from a mapping, plain-type export."""

    section: ClassVar[str]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str | None = None) -> Self:
        """The settings of `values`, checked key by key; `where` names them in errors."""
        where = where or cls.section or cls.__name__
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
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _checked(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotated type (ints accepted for floats, lists for tuples) or an error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # a mapping is a nested settings class, anything else the rest
            options = [a for a in options if _is_settings(a) == isinstance(value, Mapping)]
        if len(options) != 1:
            raise SettingsError(f"{where}: unexpected value {value!r}")
        (hint,) = options
        return _checked(value, hint, where)
    if _is_settings(hint):
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where}: expected a mapping, got {value!r}")
        return hint.from_mapping(value, where)
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


def _is_settings(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Settings)


# --------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass(frozen=True, kw_only=True)
class DownloadSettings(Settings):
    """Where the studies come from; the source's own settings are the subsection of its name."""

    section: ClassVar[str] = "download"
    # the keys of stepseg.sources.SOURCES
    source: Literal["synthetic", "tcia", "dicom_dir", "nifti_dir"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeSettings(Settings):
    """GPUs of the train and infer jobs (workflow/rules/common.smk: `gpus_per_process`)."""

    section: ClassVar[str] = "compute"
    gpus: Literal["auto", 0, 1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitSettings(Settings):
    """Fractions of patients per split (stepseg.manifest.assign_splits), normalised to sum 1."""

    section: ClassVar[str] = "split"
    seed: Count
    # no training split, no model: a zero would fail only at the train job
    train: Annotated[float, Limits(exclusiveMinimum=0, maximum=1)]
    val: Fraction
    test: Fraction


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticSettings(Settings):
    """The embedded synthetic cohort (stepseg.synthetic): every key shapes the studies' bytes."""

    section: ClassVar[str] = "download.synthetic"
    seed: Count
    n_patients: PositiveInt
    repeat_fraction: Fraction
    lesion_fraction: Fraction
    pet_shape: ZyxInt
    pet_spacing_mm: ZyxMm
    ct_shape: ZyxInt
    ct_spacing_mm: ZyxMm
    pet_fwhm_mm: NonNegative = 6.5
    pet_noise: NonNegative = 0.12
    lesion_volume_ml: tuple[Positive, Positive] = (0.5, 60.0)
    lesions_per_study: tuple[PositiveInt, PositiveInt] = (1, 6)
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
    base_url: Annotated[str, Limits(pattern="^https?://.+")]
    collection: Annotated[str, Limits(minLength=1)]
    patient_ids: tuple[str, ...] = ()
    limit: Count = 0
    manifest_file: str = ""
    clinical_file: str = ""
    verify_md5: bool = False
    timeout_s: Positive = 60.0
    max_attempts: PositiveInt = 6
    backoff_s: NonNegative = 1.0
    cache_dir: Annotated[str, Limits(minLength=1)] = "results/.partial/tcia"

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


Fill = Literal["one", "pet", "ct", "ct_window"]
Loss = Literal["dicefocal", "mse", "none"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DilationStep(Settings):
    """`iterations` dilations of the previous step's mask by an ellipsoid of `semi_axes_mm`
    (z, y, x); `semi_axes_mm=None` means "the whole image"."""

    section: ClassVar[str] = ""  # an item of targets.steps, not a config section
    semi_axes_mm: tuple[NonNegative, NonNegative, NonNegative] | None
    iterations: PositiveInt = 1

    @property
    def whole(self) -> bool:
        return self.semi_axes_mm is None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Channel(Settings):
    """One output channel: the mask of step `step` (0 = lesion; None = all-zero) times `fill`.

    `hollow` zeroes the lesion voxels (the released code does so for its outer channels, so
    they describe the surroundings only). `window` is the HU window of a `ct_window` fill,
    rescaled to [0, `window_scale`] (the released code: [-100, 100] HU to [0, 4.8]). `loss`
    tells the trainer which loss this channel gets.
    """

    section: ClassVar[str] = ""  # an item of targets.channels, not a config section
    step: Count | None
    fill: Fill = "one"
    hollow: bool = False
    loss: Loss = "mse"
    window: tuple[float, float] | None = None
    window_scale: Positive = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetsSettings(Settings):
    """The step-by-step targets (stepseg.presets): a preset's schedule, or parts of it replaced."""

    section: ClassVar[str] = "targets"
    # the names of stepseg.presets.PRESETS
    preset: Literal["paper", "released_code"] = "paper"
    # replace the preset's dilation steps (`whole`: the whole image, only last) or its channels
    steps: Annotated[tuple[DilationStep | Literal["whole"], ...], Limits(minItems=1)] | None = None
    channels: Annotated[tuple[Channel, ...], Limits(minItems=1)] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackSettings(Settings):
    """The LMDB of one split (stepseg.pack)."""

    section: ClassVar[str] = "pack"
    codec: Literal["gzip", "bz2", "lzma"] | None = "gzip"
    # 1 packs fastest, and decoding speed barely depends on it; null: the codec's own default
    level: Annotated[int, Limits(minimum=0, maximum=9)] | None = 1
    tile_shape: ZyxInt = (16, 64, 64)
    max_compressed_ratio: Fraction = 0.05
    lesion_index_max: PositiveInt = 4096
    hot_suv_min: Positive = 3.0
    hot_index_max: PositiveInt = 4096


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
        "lesion_centres": "voxel",
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
        "lesion_centres": "component",
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
    seed: Count = 0
    # stepwise: every channel of the target preset; plain: the lesion mask alone
    targets: Literal["stepwise", "plain"] = "stepwise"
    recipe: Recipe = "paper"
    # network (stepseg.model)
    channels: Annotated[tuple[PositiveInt, ...], Limits(minItems=2)]
    num_res_units: Count
    norm: Literal["instance", "batch"]
    dropout: Fraction = 0.0
    zero_input_channel: bool
    mask_head: Literal["shared", "separate"] = "shared"
    # optimiser and schedule (stepseg.schedule)
    optimizer: Literal["adam"] = "adam"
    lr: Positive
    weight_decay: NonNegative
    batch_size: PositiveInt
    patch_size: ZyxInt
    schedule: Literal["plateau_cosine", "cosine"]
    epochs: PositiveInt
    plateau_window: Annotated[int, Limits(minimum=2)] = 15
    plateau_factor: Annotated[float, Limits(exclusiveMinimum=1)] = 2.5
    plateau_min_decrease: NonNegative = 5e-3
    restart_below_lr: NonNegative = 1e-5
    restart_lr: Positive = 1e-4
    cosine_epochs: PositiveInt = 100
    # loss (stepseg.losses)
    lambda_dice: NonNegative = 1.0
    lambda_focal: NonNegative
    dice_batch: bool = False
    mask_prior: Annotated[float, Limits(minimum=0, exclusiveMaximum=1)] = 0.0
    mask_loss_scale: Positive
    small_lesion_dice_weight: NonNegative
    masked_mse: bool
    loss_weighting: Literal["automatic", "fixed"] = "automatic"
    aux_loss_weight: NonNegative = 1.0
    # sampling (stepseg.data): the released code's jitter of lesion crops, fractions of the
    # half-patch (z, y, x): +-15 of 16 slices, randint(-s // 1.5, s // 1.5) in-plane
    crop_jitter: tuple[Fraction, Fraction, Fraction] = (0.9375, 0.6667, 0.6667)
    samples_per_epoch: Count = 0
    lesion_oversampling: Positive = 2.0
    lesion_centre_fraction: Fraction = 0.5
    # where a lesion-centred crop is centred: voxel = a lesion voxel drawn uniformly (a large
    # lesion gets more crops than a small one), component = a lesion component drawn uniformly,
    # then one of its voxels (the released code: one list entry per lesion component)
    lesion_centres: Literal["voxel", "component"]
    hot_centre_fraction: Fraction = 0.0
    flips: bool = True
    val_every: PositiveInt = 5
    val_samples: Count = 32
    # hardware
    device: Annotated[str, Limits(pattern="^(auto|cpu|cuda(:[0-9]+)?)$")] = "auto"
    amp: Amp = "auto"
    num_workers: Count = 0
    processes: PositiveInt = 1
    # cross-validation (stepseg.manifest): the section's alone (SECTION_ONLY), so that every
    # variant's out-of-fold predictions cover the same studies from the same folds
    folds: PositiveInt = 1

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

    # keys added after model files were first written, each with the behaviour every model
    # trained before it had: what a stored model that lacks the key was trained with
    BEFORE_ADDED: ClassVar[dict[str, Any]] = {"lesion_centres": "voxel"}

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any], where: str) -> TrainSettings:
        """The settings a model file records, keys it predates filled by `BEFORE_ADDED`."""
        return cls.from_mapping({**cls.BEFORE_ADDED, **stored}, where)

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
            shared = sorted(set(overrides) & set(SECTION_ONLY))
            if shared:
                raise SettingsError(
                    f"{where}: {', '.join(shared)} is a setting of the train section only (the "
                    "variants are compared on the same folds), not of a variant"
                )
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
    overlap: Annotated[float, Limits(minimum=0, exclusiveMaximum=1)] = 0.5
    flip_tta: bool = False
    sw_batch_size: PositiveInt = 4
    threshold: Annotated[float, Limits(exclusiveMinimum=0, exclusiveMaximum=1)] = 0.5
    amp: Amp = "auto"
    # studies per infer job (the workflow's, not `stepseg predict`'s): 12 keeps one job per split
    # of the default cohort (starting torch and loading the model cost more than a study there)
    # and spreads each split of the 1,014-study collection (about 200 studies) over 17 jobs
    studies_per_job: PositiveInt = 12


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThresholdSettings(Settings):
    """The SUV-threshold baseline (stepseg.threshold)."""

    section: ClassVar[str] = "threshold"
    suv: Positive = 4.0
    # the clinical 41 % SUVmax rule per component; 0 = off
    relative_to_max: Fraction = 0.0
    min_volume_ml: NonNegative = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateSettings(Settings):
    """The autoPET metrics (stepseg.metrics)."""

    section: ClassVar[str] = "evaluate"
    # 18 = the official autoPET definition (cc3d)
    connectivity: Literal[6, 18, 26] = 18


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateSettings(Settings):
    """The lesion-presence gate (stepseg.gate): the whole-crop channel drops components."""

    section: ClassVar[str] = "gate"
    # evaluate `<variant>_gated` beside every variant with step-by-step targets: its predictions
    # without the components the whole-crop channel calls lesion-free, the threshold chosen on
    # out-of-fold (or val) studies only
    enabled: bool = True


MipCase = Literal["best", "median", "worst"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportSettings(Settings):
    """The results report (stepseg.report)."""

    section: ClassVar[str] = "report"
    mip_cases: Annotated[tuple[MipCase, ...], Limits(uniqueItems=True)] = (
        "best",
        "median",
        "worst",
    )
    figure_dpi: Annotated[int, Limits(minimum=30, maximum=600)] = 120


# --------------------------------------------------------------------------------------------
# config/schema.yaml, generated from the classes above

# a variant's own key besides the train keys it overrides: one training per seed
Seeds = Annotated[tuple[Count, ...], Limits(minItems=1, uniqueItems=True)]
# TrainSettings fields `for_variant` sets from the variant's key and `seeds`, never from the config
SET_BY_VARIANT = ("name", "seed")
# TrainSettings fields of the train section only, never a variant's
SECTION_ONLY = ("folds",)
TRAIN_KEYS = "#/$defs/train_settings"


def config_schema() -> dict[str, Any]:
    """The JSON schema of the config file: one object per section (`section`, dotted for nested
    ones), with every field's type, enum and `Limits`; required are the fields without a default
    and the sections holding one. `train`'s keys are a definition shared by the section and each
    of its `variants`, none required (the recipe fills what has no default)."""
    root: dict[str, Any] = {"properties": {}}
    defs: dict[str, Any] = {}
    for kind in config_sections():
        node = root
        for part in kind.section.split("."):
            node = node["properties"].setdefault(part, {"properties": {}})
        node["description"] = (kind.__doc__ or "").split("\n\n")[0].replace("\n", " ").strip()
        if kind is TrainSettings:
            keys = {k: v for k, v in _properties(kind).items() if k not in SET_BY_VARIANT}
            section = {k: keys.pop(k) for k in SECTION_ONLY}
            defs["train_settings"] = {"type": "object", "properties": keys}
            node.update(_train_section(section))
        else:
            node["properties"].update(_properties(kind))
            node["required"] = _required(kind)
    schema = _finish(root)
    schema.pop("description")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "stepseg configuration (documented key by key in config/README.md)",
        "$defs": defs,
        **schema,
    }


def config_sections() -> list[type[Settings]]:
    """Every settings class of a config section, in the order they are defined."""
    found, pending = [], list(Settings.__subclasses__())
    while pending:
        kind = pending.pop(0)
        found.append(kind)
        pending[:0] = kind.__subclasses__()
    return [kind for kind in found if kind.section]


def _properties(kind: type[Settings]) -> dict[str, Any]:
    hints = typing.get_type_hints(kind, include_extras=True)
    return {field.name: _type_schema(hints[field.name]) for field in dataclasses.fields(kind)}


def _required(kind: type[Settings]) -> list[str]:
    return [f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING]


def _train_section(section: dict[str, Any]) -> dict[str, Any]:
    """`train`: its keys, its own `section` keys (`SECTION_ONLY`), plus `variants` mapping a
    name to overrides of its keys and `seeds`."""
    variant = {
        "type": "object",
        "allOf": [{"$ref": TRAIN_KEYS}],
        "unevaluatedProperties": False,
        "required": ["seeds"],
        "properties": {"seeds": _type_schema(Seeds)},
    }
    return {
        "allOf": [{"$ref": TRAIN_KEYS}],
        "unevaluatedProperties": False,
        "required": ["variants"],
        "properties": {
            **section,
            "variants": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": f"^{names.VARIANT_PATTERN}$"},
                "additionalProperties": variant,
            },
        },
    }


def _finish(node: dict[str, Any]) -> dict[str, Any]:
    """A section object: closed (unknown keys refused) unless it is `train`, its subsections
    finished too, and required where one of its keys is."""
    properties = node["properties"]
    for key, child in properties.items():
        if "properties" in child and "type" not in child:
            properties[key] = _finish(child)
            if child.get("required"):
                node.setdefault("required", []).append(key)
    closed = {} if "unevaluatedProperties" in node else {"additionalProperties": False}
    required = node.pop("required", [])
    return {
        "description": node.pop("description", ""),
        "type": "object",
        **closed,
        **node,
        **({"required": required} if required else {}),
    }


def _type_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of one annotation (the mirror of `_checked`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        schema = _type_schema(args[0])
        for limits in hint.__metadata__:
            schema.update(limits.items)
        return schema
    if origin in (types.UnionType, typing.Union):
        options = [_type_schema(a) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return {"anyOf": options} if len(options) > 1 else options[0]
    if origin is Literal:
        return {"enum": list(args)}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0])}
        (item,) = {repr(a): a for a in args}.values()  # fixed-length tuples share one type
        return {
            "type": "array",
            "items": _type_schema(item),
            "minItems": len(args),
            "maxItems": len(args),
        }
    if _is_settings(hint):
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": _properties(hint),
            **({"required": _required(hint)} if _required(hint) else {}),
        }
    return {"type": {float: "number", int: "integer", str: "string", bool: "boolean"}[hint]}
