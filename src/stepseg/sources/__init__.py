"""Where studies come from: one module per `download.source`, one dispatch here.

Each source module provides `list_studies(settings) -> list[dict]` (records with `study_id`,
`patient_id`, `has_lesions` and the series columns of the manifest) and
`fetch_study(settings, row, out_dir)` which fills `out_dir` with the study's DICOM series.

Standard library only at import time: the workflow imports this module when it starts.
The workflow reruns a study's download only when `study_identity` changes, and rewrites the
manifest only when `listing_settings` change: a setting that decides neither what is listed nor
what a fetched study holds (timeouts, retries, caches, checksums) reruns nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stepseg.atomic import atomic_dir

SOURCES = {
    "synthetic": "stepseg.synthetic.source",
    "tcia": "stepseg.sources.tcia",
    "dicom_dir": "stepseg.sources.local:dicom_dir",
    "nifti_dir": "stepseg.sources.local:nifti_dir",
}

# Settings that only say how a study is fetched, never which studies exist or what their files
# hold: a change reruns neither the manifest nor any download.
OPERATIONAL_SETTINGS = {
    "synthetic": frozenset(),
    "tcia": frozenset({"verify_md5", "timeout_s", "max_attempts", "backoff_s", "cache_dir"}),
    "dicom_dir": frozenset(),
    "nifti_dir": frozenset(),
}
# Settings besides the manifest row that shape a fetched study's files. Synthetic: all of them
# (the generator settings shape the images, and the DICOM UIDs digest every setting, so even
# `n_patients` changes every study's bytes). dicom_dir: `link` (symlinks or copies). For tcia and
# nifti_dir the row alone identifies the files: series UIDs and image counts, resp. the folder.
STUDY_SETTINGS: dict[str, frozenset[str] | None] = {
    "synthetic": None,  # None: every setting
    "tcia": frozenset(),
    "dicom_dir": frozenset({"link"}),
    "nifti_dir": frozenset(),
}
# Manifest columns a study's files do not depend on: a new split or a new clinical table
# rewrites them without re-downloading anything.
NOT_STUDY_COLUMNS = frozenset({"split", "fold", "has_lesions"})


def _check(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown download.source {source!r}; expected one of {sorted(SOURCES)}")


def _module(source: str) -> Any:
    """The module (or, for `module:name`, the module's object) implementing the source."""
    _check(source)
    module, _, name = SOURCES[source].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, name) if name else loaded


def listing_settings(source: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide which studies the manifest lists (the manifest's rerun trigger)."""
    _check(source)
    return {k: v for k, v in settings.items() if k not in OPERATIONAL_SETTINGS[source]}


def study_identity(
    source: str, settings: Mapping[str, Any], row: Mapping[str, Any]
) -> dict[str, Any]:
    """What one fetched study's files depend on (its download's rerun trigger): its manifest row
    without split and lesion status, plus the source settings that shape its files."""
    _check(source)
    keys = STUDY_SETTINGS[source]
    shaping = dict(settings) if keys is None else {k: settings[k] for k in keys if k in settings}
    return {
        "row": {k: row[k] for k in sorted(row) if k not in NOT_STUDY_COLUMNS},
        "settings": dict(sorted(shaping.items())),
    }


def write_manifest(
    source: str,
    settings: Mapping[str, Any],
    split: Mapping[str, Any],
    out_path: str | Path,
    folds: int = 1,
) -> None:
    from stepseg import manifest  # pandas: not needed by the workflow's parse-time imports

    records = _module(source).list_studies(settings)
    fractions = {name: split[name] for name in manifest.SPLITS}
    manifest.write(manifest.assign_splits(records, fractions, split["seed"], folds), out_path)


def fetch_study(
    source: str,
    settings: Mapping[str, Any],
    manifest_path: str | Path,
    study: str,
    out_dir: str | Path,
) -> None:
    from stepseg import manifest

    table = manifest.read(manifest_path)
    rows = table[table["study_id"] == study]
    if rows.empty:
        raise ValueError(f"study {study} is not in the manifest {manifest_path}")
    with atomic_dir(out_dir) as tmp:
        _module(source).fetch_study(settings, rows.iloc[0].to_dict(), tmp)
