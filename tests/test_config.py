"""config/schema.yaml as the workflow applies it (snakemake.utils.validate, at start-up, before
any job deletes an output): per-variant train overrides and split fractions included."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "config/schema.yaml")


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


@pytest.mark.parametrize(
    "overlay", [None, "config/paper.yaml", "config/realsize.yaml", "tests/data/tiny.yaml"]
)
def test_shipped_configs_are_valid(overlay):
    config = default_config()
    if overlay:
        update_config(config, yaml.safe_load((ROOT / overlay).read_text()))
    validate(config, schema=SCHEMA)


def test_a_variant_may_override_any_train_key():
    config = default_config()
    config["train"]["variants"]["plain"].update(lr=1e-3, recipe="released_code", epochs=3)
    validate(config, schema=SCHEMA)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["train"]["variants"]["plain"].update(lr="fast"),
         r"'fast' is not of type 'number'(.|\n)*On instance\['train'\]\['variants'\]\['plain'\]"
         r"\['lr'\]"),
        (lambda c: c["train"]["variants"]["plain"].update(epochs=2.5),
         r"2.5 is not of type 'integer'"),
        (lambda c: c["train"]["variants"]["plain"].update(learning_rate=1e-3),
         r"Unevaluated properties are not allowed \('learning_rate' was unexpected\)"),
        (lambda c: c["train"]["variants"]["plain"].update(variants={}),
         r"Unevaluated properties are not allowed \('variants' was unexpected\)"),
        (lambda c: c["train"].update(learning_rate=1e-3),
         r"Unevaluated properties are not allowed \('learning_rate' was unexpected\)"),
        (lambda c: c["train"].update(lr=-1.0), r"-1.0 is less than or equal to the minimum of 0"),
        (lambda c: c["split"].update(train=0, val=0, test=0),
         r"0 is less than or equal to the minimum of 0"),
        (lambda c: c["split"].update(train=0), r"0 is less than or equal to the minimum of 0"),
        (lambda c: c.update(checks={"ct_hu_range": [-1100]}), r"\[-1100\] is too short"),
        (lambda c: c["compute"].update(gpus=2), r"2 is not one of \['auto', 0, 1\]"),
    ],
)  # fmt: skip
def test_bad_settings_stop_the_workflow_at_start_up(change, message):
    """Each used to pass `snakemake -n`, then fail a job after Snakemake had deleted its previous
    output (model.pt, manifest.tsv)."""
    config = copy.deepcopy(default_config())
    change(config)
    with pytest.raises(WorkflowError, match=message):
        validate(config, schema=SCHEMA)


def test_fp16_on_a_cpu_device_stops_the_workflow_at_start_up(tmp_path):
    """Not a schema rule (it combines two keys): common.smk refuses it before any job runs."""
    (tmp_path / "fp16.yaml").write_text("train: {device: cpu, amp: fp16}\n")
    snakemake = Path(sys.executable).parent / "snakemake"
    dry_run = subprocess.run(
        [str(snakemake), "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1",
         "--configfile", str(ROOT / "config/config.yaml"), str(tmp_path / "fp16.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dry_run.returncode != 0
    assert "train variant stepwise: amp fp16 needs a CUDA device" in dry_run.stdout + dry_run.stderr
    assert not (tmp_path / "results").exists()
