"""A local stand-in for TCIA's NBIA REST API, with faults injected on demand.

Serves `getSeries` (JSON, the v4 field names) and the series ZIPs of `getImage?NewFileNames=Yes`
and `getImageWithMD5Hash` for a directory tree of DICOM files (any layout; grouped by
SeriesInstanceUID), honours `Range: bytes=N-`, counts the body bytes it sends per series, and
misbehaves on request: cut the connection after N bytes, answer 500, stall (hang), send a
truncated ZIP with a correct-looking status and length, ignore Range, or slip a `../../x` entry
into the archive. Used by tests/test_tcia.py, the end-to-end tests and bench/download.py.

Run standalone (the benchmark does, so that server and client do not share one interpreter):
    python tests/tcia_server.py --root DIR   # prints the base URL, serves until killed
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import tempfile
import threading
import zipfile
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from stepseg.names import study_id
from stepseg.sources import tcia

API_PATH = "/nbia-api/services/v4/"
COLLECTION = "FDG-PET-CT-Lesions"
DOWNLOADS = ("getImage", "getImageWithMD5Hash")
FAULT_KINDS = ("cut", "error", "stall", "truncate", "ignore_range", "zip_slip")


@dataclass(frozen=True)
class Fault:
    """One misbehaviour for the next download request of a series (or of `getSeries`).

    cut: send `at` body bytes, then close the connection. error: answer `status`.
    stall: send `at` bytes, then wait `seconds` (None: until `release()`), then close.
    truncate: answer 200 with only the first `at` bytes and a matching Content-Length.
    ignore_range: answer 200 with the whole body even when a Range was asked for.
    zip_slip: serve the archive with an extra member named `../../x`.
    """

    kind: str
    at: int = 0
    status: int = 500
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}")


@dataclass
class Series:
    metadata: dict
    files: list[Path]


def _nbia_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]} 00:00:00.0" if len(value) >= 8 else ""


def scan_dicom_tree(root: Path, collection: str = COLLECTION) -> dict[str, Series]:
    """Series of a DICOM tree, with the getSeries record NBIA would report for each."""
    groups: dict[str, list[tuple[int, Path, pydicom.Dataset]]] = defaultdict(list)
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        groups[ds.SeriesInstanceUID].append((int(ds.get("InstanceNumber", 0) or 0), path, ds))
    series = {}
    for uid, members in groups.items():
        members.sort(key=lambda m: (m[0], str(m[1])))
        ds = members[0][2]
        files = [m[1] for m in members]
        series[uid] = Series(
            metadata={
                "SeriesInstanceUID": uid,
                "StudyInstanceUID": ds.StudyInstanceUID,
                "Modality": ds.Modality,
                "ProtocolName": str(ds.get("ProtocolName", "")),
                "SeriesDate": _nbia_date(str(ds.get("SeriesDate", ""))),
                "SeriesDescription": str(ds.get("SeriesDescription", "")),
                "BodyPartExamined": str(ds.get("BodyPartExamined", "")),
                "SeriesNumber": int(ds.get("SeriesNumber", 0) or 0),
                "Collection": collection,
                "PatientID": str(ds.PatientID),
                "Manufacturer": str(ds.get("Manufacturer", "")),
                "ManufacturerModelName": str(ds.get("ManufacturerModelName", "")),
                "SoftwareVersions": str(ds.get("SoftwareVersions", "")),
                "ImageCount": len(files),
                "TimeStamp": "2022-06-02 00:00:00.0",
                "LicenseName": "Creative Commons Attribution 4.0 International License",
                "LicenseURI": "https://creativecommons.org/licenses/by/4.0/",
                "FileSize": sum(f.stat().st_size for f in files),
                "DateReleased": "2022-06-02 00:00:00.0",
                "StudyDesc": str(ds.get("StudyDescription", "")),
                "StudyDate": _nbia_date(str(ds.get("StudyDate", ""))),
                "ThirdPartyAnalysis": "NO",
            },
            files=files,
        )
    return series


def build_zip(files: list[Path], path: Path, md5: bool, extra: Mapping[str, bytes] = {}) -> None:
    """The archive NBIA streams: `1-001.dcm`... (NewFileNames) or `00000001.dcm`... + MD5s."""
    rows = []
    # as in the collection's downloads: 1-001.dcm ... for image series, 1-1.dcm for a lone SEG
    width = 1 if len(files) == 1 else max(3, len(str(len(files))))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for index, file in enumerate(files, start=1):
            name = f"{index:08d}.dcm" if md5 else f"1-{index:0{width}d}.dcm"
            archive.write(file, name)
            rows.append((name, hashlib.md5(file.read_bytes()).hexdigest()))
        if md5:
            table = io.StringIO()
            csv.writer(table).writerows([("Filename", "MD5Hash"), *rows])
            archive.writestr("md5hashes.csv", table.getvalue())
        for name, data in extra.items():
            archive.writestr(name, data)


def write_tiny_study(
    root: Path,
    patient_id: str,
    study_date: str,
    counts: Mapping[str, int] = {"CT": 6, "PT": 4, "SEG": 1},
    side: int = 48,
    seed: int = 0,
    empty_seg: bool = False,
    folder_of: Callable[[str], str] | None = None,
) -> dict[str, str]:
    """Small DICOM files of one study (random pixels, so archives do not shrink to nothing).

    Only the tags that listing, grouping and downloading look at are filled in; these are not
    images the converter could use. `empty_seg` zeroes the SEG pixels (a lesion-free study);
    `folder_of(modality)` overrides the folder below `root` (default `<patient>/<date>/<modality>`).
    Returns {"StudyInstanceUID": ..., modality: series UID}.
    """
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    uids = {"StudyInstanceUID": study_uid}
    for number, (modality, count) in enumerate(counts.items(), start=1):
        series_uid = generate_uid()
        uids[modality] = series_uid
        relative = folder_of(modality) if folder_of else f"{patient_id}/{study_date}/{modality}"
        folder = Path(root) / relative
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, count + 1):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.PatientID = patient_id
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyDate = ds.SeriesDate = study_date
            ds.Modality = modality
            ds.SeriesNumber = number
            ds.InstanceNumber = index
            ds.Rows = ds.Columns = side
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            pixels = rng.integers(-1000, 1000, (side, side), dtype=np.int16)
            if modality == "SEG" and empty_seg:
                pixels[:] = 0
            ds.PixelData = pixels.tobytes()
            ds.save_as(folder / f"{series_uid[-8:]}-{index:04d}.dcm", enforce_file_format=True)
    return uids


class NbiaTestServer:
    """A threaded NBIA stand-in on 127.0.0.1 (port 0); use as a context manager."""

    def __init__(self, series: Mapping[str, Series], port: int = 0) -> None:
        self.series = dict(series)
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.requests: list[tuple[str, str, int]] = []  # (endpoint, key, range start)
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="nbia-test-")
        self._zips: dict[tuple[str, bool], Path] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @classmethod
    def from_dicom_tree(
        cls, root: str | Path, collection: str = COLLECTION, port: int = 0
    ) -> NbiaTestServer:
        return cls(scan_dicom_tree(Path(root), collection), port)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{API_PATH}"

    def start(self) -> NbiaTestServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._tmp.cleanup()

    def __enter__(self) -> NbiaTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_fault(self, key: str, *faults: Fault) -> None:
        """Queue faults for the next requests of series `key` (or `getSeries`), in order."""
        with self._lock:
            self._faults[key].extend(faults)

    def release(self) -> None:
        """End every stall that waits for release."""
        self._released.set()

    def zip_path(self, uid: str, md5: bool = False) -> Path:
        """The exact archive served for a series (built once, on first use)."""
        with self._lock:
            key = (uid, md5)
            if key not in self._zips:
                path = Path(self._tmp.name) / f"{uid}{'-md5' if md5 else ''}.zip"
                build_zip(self.series[uid].files, path, md5)
                self._zips[key] = path
            return self._zips[key]

    def write_clinical_file(self, path: str | Path, lesion_study_ids: Iterable[str]) -> None:
        """A clinical metadata CSV like the collection's (`diagnosis` NEGATIVE = no lesions).

        Studies are named as the TCIA source names them (`tcia.study_id`), so a test can pass
        the study ids of another source's listing, e.g. the synthetic cohort's lesion studies.
        """
        positive = set(lesion_study_ids)
        rows = [s.metadata for s in self.series.values()]
        visits = tcia.visit_numbers(rows)
        studies = {meta["StudyInstanceUID"]: meta for meta in rows}
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Subject ID", "Study UID", "Study Date", "diagnosis"])
            for uid, meta in sorted(studies.items()):
                name = study_id(meta["PatientID"], visits[uid])
                diagnosis = "LYMPHOMA" if name in positive else "NEGATIVE"
                writer.writerow([meta["PatientID"], uid, meta["StudyDate"][:10], diagnosis])

    def _next_fault(self, key: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(key)
            return queue.popleft() if queue else None


def _handler_for(server: NbiaTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if not url.path.startswith(API_PATH):
                self._send_error(404)
                return
            endpoint = url.path[len(API_PATH) :]
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if endpoint == "getSeries":
                self._get_series(query)
            elif endpoint in DOWNLOADS:
                self._get_image(query, md5=endpoint == "getImageWithMD5Hash")
            else:
                self._send_error(404)

        def _send_error(self, status: int) -> None:
            body = f"error {status}".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _get_series(self, query: dict[str, str]) -> None:
            server.requests.append(("getSeries", json.dumps(query, sort_keys=True), 0))
            fault = server._next_fault("getSeries")
            if fault is not None and fault.kind == "error":
                self._send_error(fault.status)
                return
            rows = [
                s.metadata
                for s in server.series.values()
                if all(str(s.metadata.get(k)) == v for k, v in query.items() if k != "format")
            ]
            rows.sort(key=lambda m: (m["PatientID"], m["StudyInstanceUID"], m["Modality"]))
            body = json.dumps(rows).encode() if rows else b""
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _get_image(self, query: dict[str, str], md5: bool) -> None:
            uid = query.get("SeriesInstanceUID", "")
            if uid not in server.series:
                self._send_error(400)
                return
            fault = server._next_fault(uid)
            start = _range_start(self.headers.get("Range"))
            server.requests.append(("getImageWithMD5Hash" if md5 else "getImage", uid, start))
            if fault is not None and fault.kind == "error":
                self._send_error(fault.status)
                return
            path = server.zip_path(uid, md5)
            if fault is not None and fault.kind == "zip_slip":
                path = Path(server._tmp.name) / f"{uid}-slip.zip"
                build_zip(server.series[uid].files, path, md5, {"../../x": b"escaped"})
            total = path.stat().st_size
            if fault is not None and fault.kind == "ignore_range":
                start = 0
            if start >= total and start > 0:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = total
            if fault is not None and fault.kind == "truncate":
                start, end = 0, min(fault.at, total)
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if fault is not None and fault.kind in ("cut", "stall"):
                end = min(end, start + fault.at)
            # Counted before sending: a client that got every byte may check the count before
            # this thread runs again; a short send (client gone) takes the rest back afterwards.
            with server._lock:
                server.bytes_sent[uid] += end - start
            with open(path, "rb") as handle:
                try:
                    sent = self.connection.sendfile(handle, start, end - start)
                except (BrokenPipeError, ConnectionResetError):
                    sent = 0
            if sent != end - start:
                with server._lock:
                    server.bytes_sent[uid] -= end - start - sent
            if fault is not None and fault.kind == "stall":
                if fault.seconds is None:
                    server._released.wait()
                else:
                    server._stopping.wait(fault.seconds)
            if fault is not None and fault.kind in ("cut", "stall"):
                self.close_connection = True

    return Handler


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return 0
    return int(header[len("bytes=") : -1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="directory tree of DICOM files")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = NbiaTestServer.from_dicom_tree(args.root, port=args.port)
    for uid in server.series:  # build the archives before announcing the URL
        server.zip_path(uid)
    print(server.base_url, flush=True)
    try:
        server._httpd.serve_forever()
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
