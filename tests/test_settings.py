"""stepseg.settings: the typed settings every stage reads, and the one home of their defaults."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config, validate

from stepseg.settings import (
    RECIPES,
    SET_BY_VARIANT,
    ConvertSettings,
    DicomDirSettings,
    EvaluateSettings,
    InferSettings,
    NiftiDirSettings,
    PackSettings,
    ReportSettings,
    Settings,
    SettingsError,
    SyntheticSettings,
    TargetsSettings,
    TciaSettings,
    ThresholdSettings,
    TrainSettings,
    config_sections,
)

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    ConvertSettings,
    PackSettings,
    InferSettings,
    ThresholdSettings,
    EvaluateSettings,
    ReportSettings,
]


def shipped(overlay: str | None = None) -> dict:
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    if overlay:
        update_config(config, yaml.safe_load((ROOT / overlay).read_text()))
    return config


@pytest.mark.parametrize(
    "overlay", [None, "config/paper.yaml", "config/long.yaml", "config/realsize.yaml"]
)
def test_every_shipped_config_gives_every_stage_its_settings(overlay):
    config = shipped(overlay)
    sections = {kind: config[kind.section] for kind in STAGES}
    sections[SyntheticSettings] = config["download"]["synthetic"]
    sections[TciaSettings] = config["download"]["tcia"]
    sections[DicomDirSettings] = config["download"]["dicom_dir"]
    sections[NiftiDirSettings] = config["download"]["nifti_dir"]
    for kind, section in sections.items():
        built = kind.from_mapping(section).to_dict()
        for key, value in section.items():
            assert built[key] == value, f"{kind.section}.{key}"
    for variant, spec in config["train"]["variants"].items():
        for seed in spec["seeds"]:
            trained = TrainSettings.for_variant(config["train"], variant, seed)
            assert (trained.name, trained.seed) == (variant, seed)
            assert trained.trained_name == f"{variant}-seed{seed}"


def test_default_config_values_reach_the_settings():
    config = shipped()
    stepwise = TrainSettings.for_variant(config["train"], "stepwise", 0)
    assert stepwise.channels == (8, 16, 32, 64) and stepwise.patch_size == (32, 48, 48)
    assert stepwise.loss_weighting == "fixed" and stepwise.aux_loss_weight == 0.1
    assert stepwise.lr == 3.0e-3 and stepwise.targets == "stepwise"
    # keys the config leaves to the paper recipe
    assert stepwise.weight_decay == 0.0 and stepwise.masked_mse is False
    assert InferSettings.from_mapping(config["infer"]).sw_batch_size == 4


def test_recipe_then_section_then_variant():
    train = {
        "recipe": "released_code",
        "lr": 1e-3,
        "variants": {"fast": {"targets": "plain", "seeds": [3], "lr": 2e-3, "epochs": 5}},
    }
    section = TrainSettings.for_variant(train)
    assert section.lr == 1e-3 and section.weight_decay == 4e-5  # config, then recipe
    assert section.channels == (96, 192, 192, 192, 192) and section.norm == "batch"
    fast = TrainSettings.for_variant(train, "fast", 3)
    assert (fast.lr, fast.epochs, fast.targets, fast.seed) == (2e-3, 5, "plain", 3)
    assert fast.weight_decay == 4e-5
    paper = TrainSettings.for_variant({})
    assert paper.channels == (96, 192, 384, 768, 1536) and paper.schedule == "plateau_cosine"
    assert paper.patch_size == (32, 160, 160) and paper.batch_size == 16 and paper.lr == 3e-4


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"learning_rate": 1e-3},
         r"^train\.variants\.plain: unknown setting\(s\) learning_rate; expected some of "),
        ({"lr": "fast"}, r"^train\.variants\.plain\.lr: expected a number, got 'fast'$"),
        ({"epochs": 2.5}, r"^train\.variants\.plain\.epochs: expected an integer, got 2\.5$"),
        ({"flips": 1}, r"^train\.variants\.plain\.flips: expected true or false, got 1$"),
        ({"norm": "group"},
         r"^train\.variants\.plain\.norm: expected one of 'instance', 'batch', got 'group'$"),
        ({"patch_size": [32, 48]},
         r"^train\.variants\.plain\.patch_size: expected 3 values, got \[32, 48\]$"),
        ({"channels": [8, "16"]},
         r"^train\.variants\.plain\.channels\[1\]: expected an integer, got '16'$"),
        ({"recipe": "nnunet"}, r"^train\.variants\.plain\.recipe: expected one of 'paper', "),
        ({"device": "cpu", "amp": "fp16"},
         r"^train variant plain: amp fp16 needs a CUDA device; on a CPU use bf16, auto or off$"),
        ({"folds": 3},
         r"^train\.variants\.plain: folds is a setting of the train section only \(the variants "
         r"are compared on the same folds\), not of a variant$"),
    ],
)  # fmt: skip
def test_a_variants_bad_override_is_an_error_naming_it(variant, message):
    train = {"variants": {"plain": {"targets": "plain", "seeds": [0], **variant}}}
    with pytest.raises(SettingsError, match=message):
        TrainSettings.for_variant(train, "plain", 0)


def test_stage_settings_are_checked_like_the_train_section():
    with pytest.raises(SettingsError, match=r"^evaluate\.connectivity: expected one of 6, 18, 26"):
        EvaluateSettings.from_mapping({"connectivity": True})
    with pytest.raises(SettingsError, match=r"^infer: unknown setting\(s\) overlapp; expected"):
        InferSettings.from_mapping({"overlapp": 0.5})
    with pytest.raises(SettingsError, match=r"^report\.mip_cases\[1\]: expected one of 'best'"):
        ReportSettings.from_mapping({"mip_cases": ["best", "typical"]})
    with pytest.raises(
        SettingsError, match=r"^a model\.num_res_units: missing \(it has no default\)$"
    ):
        TrainSettings.from_mapping({"channels": [4, 8]}, "a model")
    assert PackSettings.from_mapping({"codec": None}).codec is None
    assert ThresholdSettings.from_mapping({"suv": 3}).suv == 3.0  # an integer for a float


def test_settings_are_frozen_keyword_only_and_round_trip_through_plain_types():
    for kind in [*STAGES, TrainSettings]:
        fields = dataclasses.fields(kind)
        assert all(field.kw_only for field in fields), kind
    train = {"recipe": "released_code", "variants": {"plain": {"targets": "plain", "seeds": [2]}}}
    built = TrainSettings.for_variant(train, "plain", 2)
    plain = built.to_dict()
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # lists, numbers, strings only
    assert TrainSettings.from_mapping(plain) == built
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.lr = 1.0  # type: ignore[misc]


def test_each_recipe_sets_exactly_the_keys_without_a_default():
    """Every default lives in the settings classes; a recipe fills only what has none."""
    required = {
        field.name
        for field in dataclasses.fields(TrainSettings)
        if field.default is dataclasses.MISSING
    }
    for recipe in RECIPES.values():
        assert set(recipe) == required
    schema = (ROOT / "config/schema.yaml").read_text()
    assert "default:" not in schema  # the schema checks shapes, the classes hold defaults


def test_the_workflow_can_import_settings_and_names_without_numpy():
    """common.smk builds the settings before any job, in whatever Python runs Snakemake."""
    code = (
        "import sys, stepseg.settings, stepseg.names; "
        "print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert result.stdout.strip() == "[]"


def test_the_committed_schema_is_the_generated_one():
    """config/schema.yaml repeats no setting by hand: a type, enum, bound or default changed in
    settings.py without `make schema` (tools/schema.py) fails here."""
    generated = subprocess.run(
        [sys.executable, str(ROOT / "tools/schema.py")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert (ROOT / "config/schema.yaml").read_text() == generated


def test_every_code_default_is_reachable_through_the_schema():
    """A config holding only what has no default passes the schema, and every section left out
    takes the classes' defaults (a `required` list once asked for keys that had one)."""
    config = shipped()
    minimal = {
        "download": {
            "source": "synthetic",
            "synthetic": {k: v for k, v in config["download"]["synthetic"].items()
                          if k in _required(SyntheticSettings)},
            "tcia": {"base_url": "https://example.org/api/", "collection": "C"},
        },
        "compute": {"gpus": "auto"},
        "split": config["split"],
        "train": {"variants": {"plain": {"seeds": [0]}}},
    }  # fmt: skip
    validate(minimal, schema=str(ROOT / "config/schema.yaml"))
    for kind in config_sections():
        if kind is not TrainSettings and not _required(kind):
            assert kind.from_mapping({}) == kind(), kind.section
    plain = TrainSettings.for_variant(minimal["train"], "plain", 0)
    assert plain == dataclasses.replace(TrainSettings.for_variant({}), name="plain")


def _required(kind: type[Settings]) -> set[str]:
    return {f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING}


def test_targets_settings_check_their_steps_and_channels():
    settings = TargetsSettings.from_mapping(
        {"steps": [{"semi_axes_mm": [3, 4, 4]}, "whole"], "channels": [{"step": 0}]}
    )
    (step, whole), (channel,) = settings.steps, settings.channels
    assert (step.semi_axes_mm, step.iterations, whole) == ((3.0, 4.0, 4.0), 1, "whole")
    assert (channel.fill, channel.loss, channel.hollow, channel.window) == (
        "one",
        "mse",
        False,
        None,
    )
    assert settings.to_dict()["steps"] == [
        {"semi_axes_mm": [3.0, 4.0, 4.0], "iterations": 1},
        "whole",
    ]
    assert TargetsSettings.from_mapping(settings.to_dict()) == settings
    for bad, message in [
        ({"steps": ["all"]}, r"^targets\.steps\[0\]: expected one of 'whole', got 'all'$"),
        ({"channels": [{"step": 1, "fill": "mri"}]},
         r"^targets\.channels\[0\]\.fill: expected one of 'one', 'pet', 'ct', 'ct_window'"),
        ({"steps": [{"iterations": 2}]}, r"^targets\.steps\[0\]\.semi_axes_mm: missing"),
    ]:  # fmt: skip
        with pytest.raises(SettingsError, match=message):
            TargetsSettings.from_mapping(bad)


# --------------------------------------------------------------------------------------------
# config/README.md's tables against the code

README_SECTION = re.compile(r"^## (\S+)$")
KEY = re.compile(r"`([a-z0-9_]+)`")
NOTE = re.compile(r"^(?P<value>.*?)\s*(\((?P<note>[^()]*)\))?$")


def readme_rows() -> list[tuple[str, dict[str, str]]]:
    """(section heading, {column header: cell}) of every row of config/README.md's key tables."""
    rows, section, header = [], None, None
    for line in (ROOT / "config/README.md").read_text().splitlines():
        if match := README_SECTION.match(line):
            section, header = match[1], None
        elif not line.startswith("|"):
            header = None
        else:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = [cell.strip("`") for cell in cells]
            elif set(line) - set("|- "):
                rows.append((section, dict(zip(header, cells, strict=True))))
    return [(section, row) for section, row in rows if "key" in row]


def cell_values(cell: str, n_keys: int) -> tuple[list, str]:
    """The values a cell lists, one per key (a list for a list value), and its note."""
    match = NOTE.match(cell.replace("`", ""))
    values = yaml.safe_load(f"[{match['value']}]") if match["value"] else []
    values = [_number(v) for v in values]
    if values == ["required"]:
        values *= n_keys
    if n_keys == 1 and len(values) > 1:
        values = [values]
    return values, match["note"] or ""


def _number(value):
    """YAML 1.1 reads 3e-4 as a string; the tables write numbers as people do."""
    if isinstance(value, list):
        return [_number(v) for v in value]
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def test_readme_tables_show_the_code_defaults_and_where_config_yaml_differs():
    """Each key row's default is the settings class's (`required` where there is none); where
    config/config.yaml sets another value the cell says `(config.yaml: <value>)`. The train table
    shows each recipe's value and the default config's. Every setting has a row."""
    config, classes = shipped(), {kind.section: kind for kind in config_sections()}
    documented = {section: set() for section in classes}
    for section, row in readme_rows():
        kind = classes[section]
        keys = KEY.findall(row["key"])
        documented[section].update(keys)
        if kind is TrainSettings:
            _check_train_row(keys, row, config["train"])
            continue
        code = kind.__dataclass_fields__
        section_config = config
        for part in section.split("."):
            section_config = section_config.get(part, {})
        values, note = cell_values(row["default"], len(keys))
        shipped_values = cell_values(note.removeprefix("config.yaml:"), len(keys))[0]
        assert len(values) == len(keys), (section, keys, row["default"])
        for k, (key, value) in enumerate(zip(keys, values, strict=True)):
            default = code[key].default
            where = f"config/README.md {section}.{key}: default cell {row['default']!r}"
            if default is dataclasses.MISSING:
                assert value == "required", where
            else:
                assert value == (list(default) if isinstance(default, tuple) else default), where
            if key in section_config and section_config[key] != value:
                assert note.startswith("config.yaml:"), f"{where} lacks (config.yaml: ...)"
                assert shipped_values[k] == section_config[key], where
            elif note.startswith("config.yaml:"):
                assert shipped_values[k] == section_config.get(key), where
    for section, kind in classes.items():
        missing = {f.name for f in dataclasses.fields(kind)} - documented[section]
        if kind is TrainSettings:
            missing -= set(SET_BY_VARIANT)
        assert not missing, f"config/README.md ## {section} has no row for {sorted(missing)}"


def _check_train_row(keys: list[str], row: dict[str, str], section: dict) -> None:
    """Recipe columns: each recipe's value; default config: config.yaml's train value, or empty
    (or a parenthesis alone) where config.yaml leaves the key to the recipe."""
    for column, recipe in (("paper", "paper"), ("released_code", "released_code")):
        values, _ = cell_values(row[column], len(keys))
        built = TrainSettings.for_variant({"recipe": recipe}).to_dict()
        for key, value in zip(keys, values, strict=True):
            assert value == built[key], f"config/README.md train.{key}: {column} {row[column]!r}"
    values, _ = cell_values(row["default config"], len(keys))
    for k, key in enumerate(keys):
        where = f"config/README.md train.{key}: default config {row['default config']!r}"
        if values:
            assert values[k] == section.get(key), where
        else:
            assert key not in section, where
