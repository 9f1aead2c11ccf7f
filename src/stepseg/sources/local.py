"""Local sources: a DICOM tree on disk (`dicom_dir`) and the autoPET NIfTI release (`nifti_dir`).

`dicom_dir`: any folder layout; files are grouped by their tags (StudyInstanceUID, Modality,
SeriesInstanceUID) and a study is fetched by symlinking (or copying) its CT, PT and SEG files
into TCIA-style series folders of `results/raw/{study}`. `has_lesions` comes from the SEG's
pixels (exact, and SEG files are small).

`nifti_dir`: `<root>/<patient>/<study folder>/{CT,CTres,PET,SUV,SEG}.nii.gz` (any depth above
the patient folder). Conversion is skipped: the download step validates the files (SUV, PET,
CTres and SEG on one grid, SEG binary) and symlinks them into `results/raw/{study}`; the rule
`link_nifti` (workflow/rules/nifti_dir.smk) then links them to `results/nifti/{study}` in place
of `convert`. The files keep their own orientation (the release's is LAS): every stage reads them
through `stepseg.nifti.load`, which brings them to stepseg's, and grids are compared there.

Study ids are `<PatientID>_<visit>` with visits ranked by study date, as for `tcia`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom

from stepseg import dicom, nifti
from stepseg.atomic import atomic_file
from stepseg.errors import StudyError
from stepseg.names import NIFTI_NAMES, study_id
from stepseg.settings import DicomDirSettings, NiftiDirSettings
from stepseg.sources import tcia

log = logging.getLogger(__name__)

LISTING_TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "SeriesInstanceUID",
    "SeriesDate",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
]
REQUIRED_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
# autoPET/TCIA study folders start with the study date, MM-DD-YYYY
FOLDER_DATE = re.compile(r"^(\d{2})-(\d{2})-(\d{4})")


def _source(settings: DicomDirSettings | NiftiDirSettings, source: str) -> Path:
    path = settings.path
    if not path or not Path(path).is_dir():
        raise ValueError(f"download.{source}.path {path!r} is not a directory")
    return Path(path)


# --------------------------------------------------------------------------------------------
# dicom_dir


def scan_dicom_tree(root: Path) -> dict[str, dict[str, Any]]:
    """SeriesInstanceUID -> listing row (the getSeries fields) plus the folders holding it."""
    series: dict[str, dict[str, Any]] = {}
    folders: dict[str, set[str]] = defaultdict(set)
    skipped = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ds = dicom.read_header(path, None, stop_before_pixels=True, specific_tags=LISTING_TAGS)
        if ds is None:
            skipped += 1
            continue
        missing = [tag for tag in REQUIRED_TAGS if tag not in ds]
        if missing:
            raise ValueError(f"DICOM file {path} lacks {missing}")
        row = series.setdefault(
            ds.SeriesInstanceUID,
            {
                "SeriesInstanceUID": ds.SeriesInstanceUID,
                "StudyInstanceUID": ds.StudyInstanceUID,
                "PatientID": str(ds.PatientID),
                "Modality": ds.Modality,
                "StudyDate": str(ds.get("StudyDate", "") or ds.get("SeriesDate", "")),
                "SeriesNumber": ds.get("SeriesNumber", 0),
                "SeriesDescription": str(ds.get("SeriesDescription", "")),
                "ImageCount": 0,
            },
        )
        row["ImageCount"] += 1
        folders[ds.SeriesInstanceUID].add(str(path.parent.resolve()))
    for uid, row in series.items():
        row["folders"] = sorted(folders[uid])
    log.info("%s: %d series, %d non-DICOM files ignored", root, len(series), skipped)
    return series


def _series_files(study: str, folders: list[str], series_uid: str) -> list[Path]:
    files = []
    for folder in folders:
        for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
            ds = dicom.read_header(path, study, stop_before_pixels=True, specific_tags=LISTING_TAGS)
            if ds is not None and ds.get("SeriesInstanceUID") == series_uid:
                files.append(path)
    return files


def _seg_has_lesions(study: str, files: list[Path]) -> bool:
    for path in files:
        try:
            if np.any(pydicom.dcmread(path).pixel_array):
                return True
        except Exception as exc:
            raise StudyError(study, f"cannot read the SEG pixels ({exc})", path) from exc
    return False


def _list_dicom_dir(settings: Mapping[str, Any]) -> list[dict]:
    series = scan_dicom_tree(_source(DicomDirSettings.from_mapping(settings), "dicom_dir"))
    rows = list(series.values())
    records = tcia.group_series(rows, tcia.visit_numbers(rows))
    for record in records:
        for column in tcia.MODALITY_COLUMNS.values():
            record[f"{column}_dirs"] = os.pathsep.join(series[record[f"{column}_uid"]]["folders"])
        seg_folders = record["seg_series_dirs"].split(os.pathsep)
        seg_files = _series_files(record["study_id"], seg_folders, record["seg_series_uid"])
        record["has_lesions"] = _seg_has_lesions(record["study_id"], seg_files)
    return records


def _fetch_dicom_dir(settings: Mapping[str, Any], row: Mapping[str, Any], out_dir: Path) -> None:
    mode = DicomDirSettings.from_mapping(settings).link
    study = str(row["study_id"])
    for modality, column in tcia.MODALITY_COLUMNS.items():
        folders = str(row[f"{column}_dirs"]).split(os.pathsep)
        files = _series_files(study, folders, str(row[f"{column}_uid"]))
        expected = int(row.get(f"{column}_images") or 0)
        if len(files) != expected:
            raise StudyError(
                study,
                f"{modality} series {row[f'{column}_uid']} has {len(files)} files, "
                f"{expected} when listed (the tree changed since the manifest was written)",
                folders[0],
            )
        target = tcia.series_dir(out_dir, row, column)
        target.mkdir(parents=True)
        for index, path in enumerate(files, start=1):
            _place(path.resolve(), target / f"{index:05d}{path.suffix or '.dcm'}", mode)
        log.info("study %s: %s %d files (%s)", study, modality, len(files), mode)


def _place(source: Path, target: Path, mode: str) -> None:
    if mode == "symlink":
        target.symlink_to(source)
    else:
        shutil.copy2(source, target)


# --------------------------------------------------------------------------------------------
# nifti_dir


def _folder_date(name: str) -> str:
    match = FOLDER_DATE.match(name)
    return f"{match.group(3)}-{match.group(1)}-{match.group(2)}" if match else ""


def _list_nifti_dir(settings: Mapping[str, Any]) -> list[dict]:
    root = _source(NiftiDirSettings.from_mapping(settings), "nifti_dir")
    folders = sorted(p.parent for p in root.rglob("SUV.nii.gz"))
    if not folders:
        raise ValueError(f"no <patient>/<study>/SUV.nii.gz under download.nifti_dir.path {root}")
    by_patient: dict[str, list[Path]] = defaultdict(list)
    for folder in folders:
        by_patient[folder.parent.name].append(folder)
    records = []
    source_of: dict[str, Path] = {}
    for patient, studies in sorted(by_patient.items()):
        ordered = sorted(studies, key=lambda f: (_folder_date(f.name), f.name))
        for visit, folder in enumerate(ordered, start=1):
            name = study_id(patient, visit)
            if name in source_of:
                raise StudyError(
                    name,
                    f"two study folders get this id: {source_of[name]} and {folder} (their "
                    "patient folder names differ only in characters that ids replace or drop); "
                    "rename one",
                    folder,
                )
            source_of[name] = folder
            seg = nifti.load(folder / "SEG.nii.gz", name)
            records.append(
                {
                    "study_id": name,
                    "patient_id": patient,
                    "has_lesions": bool(np.any(seg.array)),
                    "ct_series": "",
                    "pet_series": "",
                    "seg_series": "",
                    "nifti_dir": str(folder.resolve()),
                }
            )
    return records


def validate_nifti_study(study: str, folder: Path) -> None:
    """Refuse a release study whose SUV, PET, CTres and SEG do not share one grid, or whose SEG
    is not binary; CT (on its own grid) must be a readable 3-D volume."""
    volumes = {name: (folder / f"{name}.nii.gz") for name in NIFTI_NAMES}
    loaded = {name: (path, nifti.load(path, study)) for name, path in volumes.items()}
    nifti.check_same_grid(study, {n: loaded[n] for n in ("SUV", "PET", "CTres", "SEG")})
    seg_path, seg = loaded["SEG"]
    values = np.unique(seg.array)
    if not np.isin(values, (0, 1)).all():
        raise StudyError(study, f"SEG is not binary (values {values[:6].tolist()})", seg_path)


def _fetch_nifti_dir(settings: Mapping[str, Any], row: Mapping[str, Any], out_dir: Path) -> None:
    study = str(row["study_id"])
    folder = Path(str(row["nifti_dir"]))
    validate_nifti_study(study, folder)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in NIFTI_NAMES:
        (Path(out_dir) / f"{name}.nii.gz").symlink_to((folder / f"{name}.nii.gz").resolve())


def link_nifti_study(study: str, raw_dir: str | Path, outputs: Mapping[str, str | Path]) -> None:
    """The `link_nifti` rule: the release files (validated when fetched) become the study's
    `results/nifti/{study}/*.nii.gz`, as symlinks to the original files (nothing is copied)."""
    for name, output in outputs.items():
        source = (Path(raw_dir) / f"{name}.nii.gz").resolve()
        if not source.is_file():
            raise StudyError(study, f"{name}.nii.gz is missing", source)
        with atomic_file(output) as temp:  # the temp file gives way to a symlink
            temp.unlink()
            temp.symlink_to(source)


# --------------------------------------------------------------------------------------------
# the source interface: one object per source (dispatched as `stepseg.sources.local:<name>`)

dicom_dir = SimpleNamespace(list_studies=_list_dicom_dir, fetch_study=_fetch_dicom_dir)
nifti_dir = SimpleNamespace(list_studies=_list_nifti_dir, fetch_study=_fetch_nifti_dir)
