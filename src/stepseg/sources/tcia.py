"""The `tcia` source: the FDG-PET-CT-Lesions collection through TCIA's public NBIA REST API.

Listing uses `getSeries` (by collection, or per SeriesInstanceUID of a `.tcia` manifest file);
series are grouped into studies by StudyInstanceUID and modality (CT, PT, SEG). A study is named
`<PatientID>_<visit>` (visit = rank of its date among the patient's studies) and its series land
in NBIA Data Retriever folders `<SeriesNumber>.000000-<SeriesDescription>-<uid5>`, both by
`stepseg.names`, as the synthetic cohort's, so the synthetic cohort served over the API lists and
converts identically. Each series is one ZIP from `getImage` (or `getImageWithMD5Hash` when
`verify_md5`), streamed into a cache folder that is not the rule's output (`cache_dir`), so that a
killed job resumes from the bytes already on disk (HTTP Range). A ZIP is renamed into place only
after its size, CRCs, image count and (optionally) MD5 hashes check out, and extraction refuses
entries that would escape the series folder.

`has_lesions` cannot be known from the imaging metadata before download; it is read from the
collection's clinical metadata table (`clinical_file`, column `diagnosis`: NEGATIVE = no lesions)
when given, else every study counts as lesion-free (splits are then by patient, unstratified).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import requests
import urllib3

from stepseg.errors import StudyError
from stepseg.names import series_folder, study_id
from stepseg.settings import TciaSettings

log = logging.getLogger(__name__)

MODALITY_COLUMNS = {"CT": "ct_series", "PT": "pet_series", "SEG": "seg_series"}
CHUNK_BYTES = 1 << 20
MD5_TABLE = "md5hashes.csv"
SAFE_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class DownloadError(RuntimeError):
    """A series could not be fetched intact within `max_attempts` tries without progress."""


class UnsafeArchiveError(ValueError):
    """A ZIP member would land outside its folder (`../../x`, `/etc/x`): never extracted."""


class _TransientError(Exception):
    """A transient failure (5xx, timeout, cut connection, corrupt archive): try again."""


# --------------------------------------------------------------------------------------------
# listing


def _iso_date(value: str) -> str:
    """NBIA dates come as `2003-03-23 00:00:00.0`, DICOM tags as `20030323`."""
    value = str(value or "").strip()
    if re.fullmatch(r"\d{8}", value):
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    match = re.match(r"(\d{4}-\d{2}-\d{2})", value)
    return match.group(1) if match else ""


def visit_numbers(series: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """StudyInstanceUID -> visit: the rank of the study by date among its patient's studies.

    Only studies with CT, PT or SEG series count; same-day studies are ordered by UID.
    """
    dates: dict[str, tuple[str, str]] = {}
    for row in series:
        if row.get("Modality") in MODALITY_COLUMNS:
            date = _iso_date(row.get("StudyDate") or row.get("SeriesDate") or "")
            dates[row["StudyInstanceUID"]] = (row["PatientID"], date)
    by_patient: dict[str, list[tuple[str, str]]] = {}
    for uid, (patient, date) in dates.items():
        by_patient.setdefault(patient, []).append((date, uid))
    return {
        uid: rank
        for studies in by_patient.values()
        for rank, (_, uid) in enumerate(sorted(studies), start=1)
    }


def read_tcia_manifest(path: str | Path) -> list[str]:
    """SeriesInstanceUIDs of a `.tcia` manifest: key=value header lines, then one UID a line."""
    uids = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and "=" not in line:
            uids.append(line)
    if not uids:
        raise ValueError(f"the .tcia manifest {path} lists no SeriesInstanceUID")
    return uids


def read_clinical_table(path: str | Path) -> dict[str, bool]:
    """StudyInstanceUID -> has lesions, from the collection's clinical metadata CSV."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"Study UID", "diagnosis"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"clinical file {path} lacks the columns {sorted(missing)}")
    return {row["Study UID"]: row["diagnosis"].strip().upper() != "NEGATIVE" for row in rows}


def group_series(
    series: Iterable[Mapping[str, Any]],
    visits: Mapping[str, int],
    lesions: Mapping[str, bool] | None = None,
) -> list[dict]:
    """Manifest records (one per study with a CT, a PT and a SEG series) from getSeries rows.

    Series of other modalities are ignored; a study with two series of one modality, or
    missing one, is an error that names the study (the collection has exactly one of each).
    """
    studies: dict[str, dict[str, Any]] = {}
    for row in series:
        modality = row.get("Modality")
        if modality not in MODALITY_COLUMNS:
            continue
        uid = row["StudyInstanceUID"]
        study = studies.setdefault(
            uid,
            {
                "study_id": study_id(row["PatientID"], visits[uid]),
                "patient_id": row["PatientID"],
                "series": {},
            },
        )
        if modality in study["series"]:
            raise StudyError(
                study["study_id"],
                f"two {modality} series ({study['series'][modality]['SeriesInstanceUID']}, "
                f"{row['SeriesInstanceUID']}); restrict the input with a .tcia manifest file",
            )
        study["series"][modality] = dict(row)
    records = []
    for uid, study in sorted(studies.items(), key=lambda kv: kv[1]["study_id"]):
        absent = sorted(set(MODALITY_COLUMNS) - set(study["series"]))
        if absent:
            raise StudyError(study["study_id"], f"no {', '.join(absent)} series in TCIA")
        record = {
            "study_id": study["study_id"],
            "patient_id": study["patient_id"],
            "has_lesions": bool(lesions.get(uid, False)) if lesions else False,
            "study_uid": uid,
        }
        for modality, column in MODALITY_COLUMNS.items():
            entry = study["series"][modality]
            record[column] = series_folder(
                int(float(entry.get("SeriesNumber") or 0)),
                str(entry.get("SeriesDescription") or modality),
                entry["SeriesInstanceUID"],
            )
            record[f"{column}_uid"] = entry["SeriesInstanceUID"]
            record[f"{column}_images"] = int(entry.get("ImageCount") or 0)
        records.append(record)
    return records


def list_studies(settings: Mapping[str, Any]) -> list[dict]:
    """The source interface: studies of the collection (or of the .tcia manifest file).

    With a manifest file, the listed series are looked up one by one and their patients' full
    listings are fetched too, so that visit numbers (and thus study ids) do not depend on which
    studies the manifest happens to select.
    """
    config = TciaSettings.from_mapping(settings)
    collection = {"Collection": config.collection}
    with requests.Session() as session:
        if config.manifest_file:
            series = []
            for uid in read_tcia_manifest(config.manifest_file):
                series.extend(_get_json(session, config, "getSeries", {"SeriesInstanceUID": uid}))
            everything = []
            for patient in sorted({row["PatientID"] for row in series}):
                query = {**collection, "PatientID": patient}
                everything.extend(_get_json(session, config, "getSeries", query))
        else:
            series = everything = _get_json(session, config, "getSeries", collection)
    if config.patient_ids:
        wanted = set(config.patient_ids)
        series = [row for row in series if row.get("PatientID") in wanted]
    lesions = read_clinical_table(config.clinical_file) if config.clinical_file else None
    if lesions is None:
        log.warning("no clinical_file: has_lesions is unknown for TCIA and set to False")
    records = group_series(series, visit_numbers(everything), lesions)
    if config.limit:
        records = records[: config.limit]
    log.info("TCIA %s: %d studies", config.collection, len(records))
    return records


def _get_json(
    session: requests.Session, config: TciaSettings, endpoint: str, params: dict[str, str]
) -> list[dict]:
    url = config.base_url + endpoint
    for attempt in range(config.max_attempts):
        try:
            response = session.get(url, params=params, timeout=config.timeout_s)
            if response.status_code < 500:
                response.raise_for_status()
                # NBIA answers an empty result with an empty body, not `[]`
                return response.json() if response.content.strip() else []
            reason = f"HTTP {response.status_code}"
        except (requests.ConnectionError, requests.Timeout) as exc:
            reason = str(exc)
        log.warning("%s %s failed (%s), attempt %d", endpoint, params, reason, attempt + 1)
        if attempt + 1 < config.max_attempts:
            time.sleep(config.backoff_s * 2**attempt)
    raise DownloadError(f"{url} {params}: no answer after {config.max_attempts} attempts")


# --------------------------------------------------------------------------------------------
# downloading


def download_series(
    config: TciaSettings,
    series_uid: str,
    image_count: int = 0,
    session: requests.Session | None = None,
) -> Path:
    """Fetch one series ZIP into `cache_dir`, resuming a partial file; return the verified ZIP.

    Tries that add bytes to the partial file do not count against `max_attempts`: a flaky link
    that keeps making progress finishes; a server that keeps failing does not loop forever.
    """
    cache = Path(config.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{series_uid}.zip"
    part = cache / f"{series_uid}.zip.part"
    if final.exists():
        return final
    endpoint = "getImageWithMD5Hash" if config.verify_md5 else "getImage"
    params = {"SeriesInstanceUID": series_uid}
    if not config.verify_md5:
        params["NewFileNames"] = "Yes"
    own_session = session is None
    session = session or requests.Session()
    failures = 0
    try:
        while failures < config.max_attempts:
            before = part.stat().st_size if part.exists() else 0
            try:
                _stream_to(session, config, config.base_url + endpoint, params, part)
                verify_series_zip(part, series_uid, image_count, config.verify_md5)
                os.replace(part, final)
                return final
            except _TransientError as exc:
                progressed = part.exists() and part.stat().st_size > before
                failures = 0 if progressed else failures + 1
                log.warning("series %s: %s (%d failed tries)", series_uid, exc, failures)
                if not progressed:
                    time.sleep(config.backoff_s * 2 ** (failures - 1))
    finally:
        if own_session:
            session.close()
    raise DownloadError(
        f"series {series_uid}: not fetched intact after {config.max_attempts} tries without "
        f"progress from {config.base_url}{endpoint}"
    )


def _stream_to(
    session: requests.Session,
    config: TciaSettings,
    url: str,
    params: dict[str, str],
    part: Path,
) -> None:
    """Append the rest of the body to `part` (Range request), or restart when not honoured."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with session.get(
            url, params=params, headers=headers, stream=True, timeout=config.timeout_s
        ) as response:
            if response.status_code == 416:
                return  # the partial file already holds the whole body: verify it
            if response.status_code >= 500:
                raise _TransientError(f"HTTP {response.status_code}")
            response.raise_for_status()
            expected = _expected_total(response, offset)
            if response.status_code != 206:
                offset = 0  # server ignored the Range header: start over
            with open(part, "r+b" if offset else "wb") as handle:
                handle.seek(offset)
                handle.truncate()
                # `raw.read1` hands over whatever has arrived, so bytes received before a
                # stall are on disk when the read times out; ZIPs are never content-encoded.
                read = response.raw.read1
                while chunk := read(CHUNK_BYTES):
                    handle.write(chunk)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _TransientError(f"connection: {exc}") from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # cut or stalled mid-body
        raise _TransientError(f"transfer: {exc}") from exc
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise _TransientError(f"got {size} bytes, the server announced {expected}")


def _expected_total(response: requests.Response, offset: int) -> int | None:
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
        if not match or int(match.group(1)) != offset:
            raise _TransientError(f"bad Content-Range {content_range!r} for offset {offset}")
        return None if match.group(3) == "*" else int(match.group(3))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def verify_series_zip(path: Path, series_uid: str, image_count: int, verify_md5: bool) -> None:
    """Refuse (and delete, so that it is fetched again) a ZIP that is not intact.

    Checks: readable central directory, every member's CRC, the number of DICOM members
    against the series' ImageCount when known, and the MD5 table of getImageWithMD5Hash.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise _TransientError(f"CRC mismatch in member {bad}")
            names = [n for n in archive.namelist() if not n.endswith("/")]
            check_member_names(names)
            dicoms = [n for n in names if PurePosixPath(n).name != MD5_TABLE]
            if image_count and len(dicoms) != image_count:
                raise _TransientError(f"{len(dicoms)} files in the ZIP, ImageCount {image_count}")
            if verify_md5:
                _check_md5(archive, dicoms)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        path.unlink(missing_ok=True)
        raise _TransientError(f"corrupt ZIP ({exc})") from exc
    except (_TransientError, UnsafeArchiveError):
        path.unlink(missing_ok=True)
        raise
    log.info("series %s: ZIP verified (%d bytes)", series_uid, path.stat().st_size)


def _check_md5(archive: zipfile.ZipFile, dicoms: list[str]) -> None:
    if MD5_TABLE not in archive.namelist():
        raise _TransientError(f"{MD5_TABLE} missing from getImageWithMD5Hash archive")
    table = io.StringIO(archive.read(MD5_TABLE).decode("utf-8-sig"))
    expected = {row["Filename"]: row["MD5Hash"].strip().lower() for row in csv.DictReader(table)}
    if set(expected) != set(dicoms):
        raise _TransientError(f"{MD5_TABLE} lists other files than the archive holds")
    for name in dicoms:
        digest = hashlib.md5()
        with archive.open(name) as member:
            while block := member.read(CHUNK_BYTES):
                digest.update(block)
        if digest.hexdigest() != expected[name]:
            raise _TransientError(f"MD5 mismatch for {name}")


def check_member_names(names: Iterable[str]) -> None:
    """Refuse absolute member names and names with `..` components (also Windows-style)."""
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/"))
        if parts.is_absolute() or ".." in parts.parts or re.match(r"[A-Za-z]:", name):
            raise UnsafeArchiveError(f"ZIP member {name!r} escapes the series folder")


def extract_series(zip_path: Path, target: Path, study: str) -> int:
    """Unpack the DICOM members into `target`; refuse members that would land outside it."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    count = 0
    with zipfile.ZipFile(zip_path) as archive:
        try:
            check_member_names(archive.namelist())
        except UnsafeArchiveError as exc:
            raise StudyError(study, str(exc), zip_path) from exc
        for info in archive.infolist():
            if info.is_dir() or PurePosixPath(info.filename).name == MD5_TABLE:
                continue
            destination = root / info.filename
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink, CHUNK_BYTES)
            count += 1
    return count


def series_dir(out_dir: Path, row: Mapping[str, Any], column: str) -> Path:
    """Where a series goes inside the study folder: the manifest's TCIA-style folder name,
    checked to be one plain path component (the manifest is a file users may edit)."""
    folder = str(row[column])
    if not SAFE_FOLDER.fullmatch(folder) or folder in (".", ".."):
        raise StudyError(str(row["study_id"]), f"{column} {folder!r} is not a plain folder name")
    return Path(out_dir) / folder


def fetch_study(settings: Mapping[str, Any], row: Mapping[str, Any], out_dir: Path) -> None:
    """The source interface: download, verify and unpack the study's CT, PET and SEG series.

    Cached ZIPs are deleted only after the whole study is unpacked, so that a retry of a study
    whose last series failed does not fetch the first ones again.
    """
    config = TciaSettings.from_mapping(settings)
    study = str(row["study_id"])
    zips = []
    with requests.Session() as session:
        for modality, column in MODALITY_COLUMNS.items():
            uid = str(row[f"{column}_uid"])
            images = int(row.get(f"{column}_images") or 0)
            try:
                zip_path = download_series(config, uid, images, session)
            except UnsafeArchiveError as exc:
                raise StudyError(study, f"{modality} series {uid}: {exc}") from exc
            count = extract_series(zip_path, series_dir(out_dir, row, column), study)
            log.info("study %s: %s series %s, %d files", study, modality, uid, count)
            zips.append(zip_path)
    for zip_path in zips:
        zip_path.unlink(missing_ok=True)
