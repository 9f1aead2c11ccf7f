"""Where studies come from: one module per `download.source`, one dispatch here.

Each source module provides `list_studies(settings) -> list[dict]` (records with `study_id`,
`patient_id`, `has_lesions` and the series columns of the manifest) and
`fetch_study(settings, row, out_dir)` which fills `out_dir` with the study's DICOM series.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stepseg import manifest
from stepseg.atomic import atomic_dir

SOURCES = {
    "synthetic": "stepseg.synthetic.source",
    "tcia": "stepseg.sources.tcia",
    "dicom_dir": "stepseg.sources.local:dicom_dir",
    "nifti_dir": "stepseg.sources.local:nifti_dir",
}


def _module(source: str) -> Any:
    """The module (or, for `module:name`, the module's object) implementing the source."""
    if source not in SOURCES:
        raise ValueError(f"unknown download.source {source!r}; expected one of {sorted(SOURCES)}")
    module, _, name = SOURCES[source].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, name) if name else loaded


def write_manifest(
    source: str, settings: Mapping[str, Any], split: Mapping[str, Any], out_path: str | Path
) -> None:
    records = _module(source).list_studies(settings)
    fractions = {name: split[name] for name in manifest.SPLITS}
    manifest.write(manifest.assign_splits(records, fractions, split["seed"]), out_path)


def fetch_study(
    source: str,
    settings: Mapping[str, Any],
    manifest_path: str | Path,
    study: str,
    out_dir: str | Path,
) -> None:
    table = manifest.read(manifest_path)
    rows = table[table["study_id"] == study]
    if rows.empty:
        raise ValueError(f"study {study} is not in the manifest {manifest_path}")
    with atomic_dir(out_dir) as tmp:
        _module(source).fetch_study(settings, rows.iloc[0].to_dict(), tmp)
