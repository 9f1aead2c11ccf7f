"""Series download throughput: stepseg's TCIA client against curl, same ZIP, same local server.

The NBIA stand-in (tests/tcia_server.py) runs in its own process and serves one CT series of
random-pixel DICOM slices as a ZIP; curl and stepseg fetch it in alternating rounds. Rows:
the HTTP transfer alone (curl; stepseg's streaming into the partial file), and the whole
`download_series` (transfer + the CRC check of every member + image count), whose fair baseline
is curl followed by the same CRC test (`zipfile.testzip`). curl is timed by its own
`%{time_total}`, without its process start. Medians of the rounds.

    .venv/bin/python bench/download.py [--slices 400] [--side 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = 77  # the exit status `make bench` reads as "cannot run here", after the reason
# row -> the row it is compared with (throughput ratio: above 1 = faster than the baseline)
ROWS = {
    "curl": "curl",
    "stepseg transfer": "curl",
    "curl + testzip": "curl + testzip",
    "stepseg download_series": "curl + testzip",
}
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import requests  # noqa: E402
from tcia_server import write_tiny_study  # noqa: E402

from stepseg.sources import tcia  # noqa: E402


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tcia_server.py"), "--root", str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    return server, server.stdout.readline().strip()


def time_curl(url: str, out: Path) -> float:
    """curl's own transfer time (`%{time_total}`), so that its process start is not counted."""
    done = subprocess.run(
        ["curl", "-sSf", "-o", str(out), "-w", "%{time_total}", url],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(done.stdout)


def time_curl_verified(url: str, out: Path) -> float:
    """curl, then the same CRC test of every member that stepseg runs (zipfile.testzip)."""
    seconds = time_curl(url, out)
    start = time.perf_counter()
    with zipfile.ZipFile(out) as archive:
        if archive.testzip() is not None:
            sys.exit("curl's download is corrupt")
    return seconds + time.perf_counter() - start


def time_transfer(base_url: str, uid: str, part: Path) -> float:
    part.unlink(missing_ok=True)
    config = tcia.TciaSettings.from_mapping({"base_url": base_url, "collection": "bench"})
    params = {"SeriesInstanceUID": uid, "NewFileNames": "Yes"}
    with requests.Session() as session:
        start = time.perf_counter()
        tcia._stream_to(session, config, base_url + "getImage", params, part)
        return time.perf_counter() - start


def time_ours(base_url: str, uid: str, images: int, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    config = tcia.TciaSettings.from_mapping(
        {"base_url": base_url, "collection": "bench", "cache_dir": str(cache)}
    )
    start = time.perf_counter()
    tcia.download_series(config, uid, images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=400, help="DICOM files in the series")
    parser.add_argument("--side", type=int, default=256, help="rows = columns of each slice")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        print(
            "skipped: needs curl, the baseline, which is not installed (apt-get install curl)",
            file=sys.stderr,
        )
        sys.exit(SKIPPED)

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        tmp = Path(tmp)
        uids = write_tiny_study(tmp / "dicom", "BENCH", "20220101", {"CT": args.slices}, args.side)
        server, base_url = start_server(tmp / "dicom")
        try:
            url = f"{base_url}getImage?NewFileNames=Yes&SeriesInstanceUID={uids['CT']}"
            times: dict[str, list[float]] = {name: [] for name in ROWS}
            for _ in range(args.rounds):
                times["curl"].append(time_curl(url, tmp / "curl.zip"))
                times["stepseg transfer"].append(time_transfer(base_url, uids["CT"], tmp / "p"))
                times["curl + testzip"].append(time_curl_verified(url, tmp / "curl.zip"))
                times["stepseg download_series"].append(
                    time_ours(base_url, uids["CT"], args.slices, tmp / "cache")
                )
            ours_zip = tmp / "cache" / f"{uids['CT']}.zip"
            for other in (tmp / "curl.zip", tmp / "p"):
                if ours_zip.read_bytes() != other.read_bytes():
                    sys.exit(f"{other.name} differs from stepseg's download")
            size_mb = ours_zip.stat().st_size / 1e6
        finally:
            server.terminate()
            server.wait()

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"series ZIP: {size_mb:.1f} MB, {args.slices} slices of {args.side}^2, {args.rounds} rounds"
    )
    print(f"{'client':<26}{'median s':>10}{'MB/s':>8}{'vs baseline':>13}  baseline")
    for name, baseline in ROWS.items():
        ratio = medians[baseline] / medians[name]
        print(
            f"{name:<26}{medians[name]:>10.3f}{size_mb / medians[name]:>8.0f}{ratio:>13.2f}"
            f"  {baseline}"
        )


if __name__ == "__main__":
    main()
