"""stepseg.settings: the typed settings every stage reads, and the one home of their defaults."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from stepseg.settings import (
    RECIPES,
    ConvertSettings,
    DicomDirSettings,
    EvaluateSettings,
    InferSettings,
    NiftiDirSettings,
    PackSettings,
    ReportSettings,
    SettingsError,
    SyntheticSettings,
    TciaSettings,
    ThresholdSettings,
    TrainSettings,
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
