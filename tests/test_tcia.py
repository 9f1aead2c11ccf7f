"""The TCIA client against a local NBIA stand-in: listing, resume, retries, verification."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from tcia_server import Fault, NbiaTestServer, write_tiny_study

from stepseg.errors import StudyError
from stepseg.names import study_id
from stepseg.sources import tcia

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    uids = {
        "PETCT_aaa_1": write_tiny_study(root, "PETCT_aaa", "20030323", seed=1),
        "PETCT_aaa_2": write_tiny_study(root, "PETCT_aaa", "20040101", seed=2),
        "PETCT_bbb_1": write_tiny_study(root, "PETCT_bbb", "20050505", seed=3),
    }
    return root, uids


@pytest.fixture
def server(cohort):
    with NbiaTestServer.from_dicom_tree(cohort[0]) as srv:
        yield srv


def settings(server, tmp_path, **extra):
    """Client settings; 5 s timeouts, so a slow local reply on a loaded runner never adds a retry
    to the exact request sequences asserted below (only the hang test shortens it)."""
    return {
        "base_url": server.base_url,
        "collection": "FDG-PET-CT-Lesions",
        "timeout_s": 5.0,
        "max_attempts": 3,
        "backoff_s": 0.01,
        "cache_dir": str(tmp_path / "partial"),
        **extra,
    }


def ct_uid(cohort):
    return cohort[1]["PETCT_aaa_1"]["CT"]


def test_study_id_is_patient_and_visit_rank_by_date():
    rows = [
        {"StudyInstanceUID": u, "PatientID": p, "Modality": "PT", "StudyDate": d}
        for u, p, d in [
            ("1.9", "A", "2004-01-01 00:00:00.0"),
            ("1.5", "A", "2003-03-23 00:00:00.0"),
            ("1.7", "B", ""),
            ("1.8", "A", "2004-01-01 00:00:00.0"),
        ]
    ]
    assert tcia.visit_numbers(rows) == {"1.5": 1, "1.8": 2, "1.9": 3, "1.7": 1}
    assert study_id("PETCT_0011f3deaf", 2) == "PETCT_0011f3deaf_2"
    assert study_id("P 1/x", 1) == "P-1-x_1"


def test_list_studies_groups_series_by_study_and_modality(server, cohort, tmp_path):
    records = tcia.list_studies(settings(server, tmp_path))
    assert [r["patient_id"] for r in records] == ["PETCT_aaa", "PETCT_aaa", "PETCT_bbb"]
    first = records[0]
    uids = cohort[1]["PETCT_aaa_1"]
    assert [r["study_id"] for r in records] == ["PETCT_aaa_1", "PETCT_aaa_2", "PETCT_bbb_1"]
    assert first["study_uid"] == uids["StudyInstanceUID"]
    assert (first["ct_series_uid"], first["pet_series_uid"], first["seg_series_uid"]) == (
        uids["CT"],
        uids["PT"],
        uids["SEG"],
    )
    assert (first["ct_series_images"], first["pet_series_images"]) == (6, 4)
    assert first["ct_series"] == f"1.000000-CT-{uids['CT'][-5:]}"  # TCIA folder naming
    assert not any(r["has_lesions"] for r in records)


def test_list_studies_subset_limit_manifest_and_clinical_file(server, cohort, tmp_path):
    uids = cohort[1]
    only_b = tcia.list_studies(settings(server, tmp_path, patient_ids=["PETCT_bbb"]))
    assert [r["study_uid"] for r in only_b] == [uids["PETCT_bbb_1"]["StudyInstanceUID"]]
    assert len(tcia.list_studies(settings(server, tmp_path, limit=2))) == 2

    manifest = tmp_path / "subset.tcia"
    series = [uids["PETCT_aaa_2"][m] for m in ("CT", "PT", "SEG")]
    manifest.write_text(
        "downloadServerUrl=https://example/servlet\nincludeAnnotation=true\nnoOfrRetry=4\n"
        "databasedirectory=\nmanifestVersion=3.0\nListOfSeriesToDownload=\n" + "\n".join(series)
    )
    clinical = tmp_path / "clinical.csv"
    server.write_clinical_file(clinical, ["PETCT_aaa_2"])
    records = tcia.list_studies(
        settings(server, tmp_path, manifest_file=str(manifest), clinical_file=str(clinical))
    )
    # the visit number counts the patient's studies left out of the manifest
    assert [(r["study_id"], r["study_uid"], r["has_lesions"]) for r in records] == [
        ("PETCT_aaa_2", uids["PETCT_aaa_2"]["StudyInstanceUID"], True)
    ]


def test_listing_retries_server_errors(server, tmp_path):
    server.add_fault("getSeries", Fault("error", status=502))
    assert len(tcia.list_studies(settings(server, tmp_path))) == 3
    assert [r[0] for r in server.requests] == ["getSeries", "getSeries"]


def test_study_missing_a_modality_is_named():
    rows = [{"StudyInstanceUID": "1.2.345", "PatientID": "P", "Modality": "CT",
             "SeriesInstanceUID": "9", "StudyDate": "2003-03-23 00:00:00.0"}]  # fmt: skip
    with pytest.raises(StudyError, match=r"study P_1: no PT, SEG series"):
        tcia.group_series(rows, tcia.visit_numbers(rows))


def test_fetch_study_extracts_every_series(server, cohort, tmp_path):
    config = settings(server, tmp_path)
    row = tcia.list_studies(config)[0]
    out = tmp_path / "raw"
    tcia.fetch_study(config, row, out)
    folders = [row["ct_series"], row["pet_series"], row["seg_series"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(folders)
    assert len(list((out / row["ct_series"]).glob("*.dcm"))) == 6
    ct_source = sorted((cohort[0] / "PETCT_aaa" / "20030323" / "CT").iterdir())
    assert (out / row["ct_series"] / "1-001.dcm").read_bytes() == ct_source[0].read_bytes()
    assert list((tmp_path / "partial").iterdir()) == []  # cache emptied after the study


def test_cut_connection_resumes_with_range_byte_identical(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    total = server.zip_path(uid).stat().st_size
    server.add_fault(uid, Fault("cut", at=total // 2))
    path = tcia.download_series(tcia.TciaSettings.from_mapping(settings(server, tmp_path)), uid, 6)
    assert path.read_bytes() == server.zip_path(uid).read_bytes()
    assert [r[2] for r in server.requests if r[1] == uid] == [0, total // 2]
    assert server.bytes_sent[uid] == total


def test_server_error_then_success(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    server.add_fault(uid, Fault("error", status=500), Fault("error", status=503))
    config = tcia.TciaSettings.from_mapping(settings(server, tmp_path))
    assert tcia.download_series(config, uid, 6).read_bytes() == server.zip_path(uid).read_bytes()
    assert len([r for r in server.requests if r[1] == uid]) == 3


def test_persistent_errors_give_up_after_max_attempts(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    server.add_fault(uid, *[Fault("error")] * 3)
    config = tcia.TciaSettings.from_mapping(settings(server, tmp_path))
    with pytest.raises(tcia.DownloadError, match=f"series {uid}: not fetched intact after 3"):
        tcia.download_series(config, uid, 6)


def test_hang_times_out_then_resumes(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    total = server.zip_path(uid).stat().st_size
    # the server would stall for a minute: a client that waits for it instead of timing out
    # after 1 s takes 60 s, far beyond the bound, and a loaded runner stays far within it
    server.add_fault(uid, Fault("stall", at=1000, seconds=60.0))
    config = tcia.TciaSettings.from_mapping(settings(server, tmp_path, timeout_s=1.0))
    start = time.monotonic()
    path = tcia.download_series(config, uid, 6)
    assert time.monotonic() - start < 20.0
    assert path.read_bytes() == server.zip_path(uid).read_bytes()
    assert server.bytes_sent[uid] == total


def test_truncated_zip_with_good_status_is_refetched(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    total = server.zip_path(uid).stat().st_size
    server.add_fault(uid, Fault("truncate", at=total - 100))
    config = tcia.TciaSettings.from_mapping(settings(server, tmp_path))
    assert tcia.download_series(config, uid, 6).read_bytes() == server.zip_path(uid).read_bytes()
    assert [r[2] for r in server.requests if r[1] == uid] == [0, 0]  # refetched from scratch


def test_server_ignoring_range_restarts_cleanly(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    total = server.zip_path(uid).stat().st_size
    server.add_fault(uid, Fault("cut", at=total // 3), Fault("ignore_range"))
    config = tcia.TciaSettings.from_mapping(settings(server, tmp_path))
    assert tcia.download_series(config, uid, 6).read_bytes() == server.zip_path(uid).read_bytes()
    assert server.bytes_sent[uid] == total // 3 + total


def test_image_count_mismatch_is_refused(server, cohort, tmp_path):
    config = tcia.TciaSettings.from_mapping(settings(server, tmp_path))
    with pytest.raises(tcia.DownloadError):
        tcia.download_series(config, ct_uid(cohort), image_count=7)
    assert list((tmp_path / "partial").glob("*.zip*")) == []


def test_md5_variant_verified_and_table_not_extracted(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    config = tcia.TciaSettings.from_mapping(settings(server, tmp_path, verify_md5=True))
    path = tcia.download_series(config, uid, 6)
    assert path.read_bytes() == server.zip_path(uid, md5=True).read_bytes()
    assert tcia.extract_series(path, tmp_path / "out", "s") == 6
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[0] == "00000001.dcm"
    assert not (tmp_path / "out" / "md5hashes.csv").exists()


def test_md5_mismatch_is_detected(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("00000001.dcm", b"data")
        archive.writestr("md5hashes.csv", "Filename,MD5Hash\n00000001.dcm,0123\n")
    with pytest.raises(tcia._TransientError, match=r"MD5 mismatch for 00000001\.dcm"):
        tcia.verify_series_zip(path, "1.2", 1, verify_md5=True)
    assert not path.exists()


def test_series_folder_from_the_manifest_must_be_one_plain_name(tmp_path):
    row = {"study_id": "P_1", "ct_series": "../../etc"}
    with pytest.raises(StudyError, match=r"study P_1: ct_series '\.\./\.\./etc' is not a plain"):
        tcia.series_dir(tmp_path, row, "ct_series")


def test_zip_slip_entry_is_refused(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    server.add_fault(uid, Fault("zip_slip"))
    config = settings(server, tmp_path)
    row = tcia.list_studies(config)[0]
    out = tmp_path / "a" / "b" / "raw"
    with pytest.raises(StudyError, match=r"study .*CT series .*ZIP member '\.\./\.\./x' escapes"):
        tcia.fetch_study(config, row, out)
    assert not list(tmp_path.rglob("x"))


@pytest.mark.parametrize("name", ["/etc/evil", "a/../../evil"])
def test_absolute_and_nested_escapes_are_refused(tmp_path, name):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, b"x")
    with pytest.raises(StudyError, match="escapes the series folder"):
        tcia.extract_series(path, tmp_path / "out", "s")


CLIENT = """
import sys
from stepseg.sources import tcia
config = tcia.TciaSettings.from_mapping(
    {"base_url": sys.argv[1], "collection": "c", "cache_dir": sys.argv[3], "timeout_s": 30}
)
tcia.download_series(config, sys.argv[2], 6)
"""


def test_killed_download_resumes_from_bytes_on_disk(server, cohort, tmp_path):
    uid = ct_uid(cohort)
    total = server.zip_path(uid).stat().st_size
    half = total // 2
    server.add_fault(uid, Fault("stall", at=half))  # stalls until released
    cache = tmp_path / "partial"
    command = [sys.executable, "-c", textwrap.dedent(CLIENT), server.base_url, uid, str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    first = subprocess.Popen(command, env=env)
    part = cache / f"{uid}.zip.part"
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size == half):
        assert time.monotonic() < deadline, "the client never wrote the first half"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    server.release()
    subprocess.run(command, env=env, check=True, timeout=60)
    assert (cache / f"{uid}.zip").read_bytes() == server.zip_path(uid).read_bytes()
    assert server.bytes_sent[uid] == total  # the second run fetched only the missing half
    assert [r[2] for r in server.requests if r[1] == uid] == [0, half]


def test_synthetic_cohort_served_over_nbia_lists_and_fetches_identically(
    tmp_path, micro_synthetic_settings
):
    """Same study ids, patients, lesion status, series folders and files as the synthetic source."""
    from stepseg.synthetic import source as synthetic

    expected = synthetic.list_studies(micro_synthetic_settings)
    raw = tmp_path / "raw"
    for row in expected:
        (raw / row["study_id"]).mkdir(parents=True)
        synthetic.fetch_study(micro_synthetic_settings, row, raw / row["study_id"])
    with NbiaTestServer.from_dicom_tree(raw) as srv:
        clinical = tmp_path / "clinical.csv"
        srv.write_clinical_file(clinical, [r["study_id"] for r in expected if r["has_lesions"]])
        config = settings(srv, tmp_path, clinical_file=str(clinical))
        records = tcia.list_studies(config)
        columns = ["study_id", "patient_id", "has_lesions", "ct_series", "pet_series", "seg_series"]
        assert [{c: r[c] for c in columns} for r in records] == expected
        fetched = tmp_path / "fetched"
        for row in records:
            tcia.fetch_study(config, row, fetched / row["study_id"])
    for row in expected:
        for column in ("ct_series", "pet_series", "seg_series"):
            original = sorted((raw / row["study_id"] / row[column]).iterdir())
            copy = sorted((fetched / row["study_id"] / row[column]).iterdir())
            assert [p.name for p in copy] == [p.name for p in original]
            assert [p.read_bytes() for p in copy] == [p.read_bytes() for p in original]
