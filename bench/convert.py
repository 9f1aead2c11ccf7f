"""Seconds per study: stepseg's DICOM -> NIfTI conversion against dcm2niix, in the same run.

For each geometry, one synthetic study with lesions is generated (or `--study-dir` is taken), then
`convert_study` (all five outputs: CT, PET, SUV, CTres, SEG) and `dcm2niix -z y` on the same
study's CT and PET series (two NIfTI files, no SUV, resampling or SEG) are each timed
`--repeats` times; the table shows the fastest run of each, in wall-clock and CPU seconds (CPU
includes child processes such as dcm2niix's pigz), and the ratio ours / dcm2niix. CPU time is the
fairer number on a shared machine. Target: ratio <= 3.

    .venv/bin/python bench/convert.py                         # default and large geometry
    .venv/bin/python bench/convert.py --geometry default --repeats 1
    .venv/bin/python bench/convert.py --pet-shape 326,400,400 --pet-spacing 3,2.04,2.04 \
        --ct-shape 326,512,512 --ct-spacing 3,0.98,0.98       # the real collection's grids
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stepseg.convert import convert_study  # noqa: E402
from stepseg.names import NIFTI_NAMES  # noqa: E402
from stepseg.settings import ConvertSettings  # noqa: E402
from stepseg.synthetic import source  # noqa: E402

# (pet shape, pet spacing, ct shape, ct spacing), (z, y, x); "large" keeps the default field of
# view at about twice the resolution
GEOMETRIES = {
    "default": None,  # config/config.yaml
    "large": ([192, 160, 160], [3.0, 3.25, 3.25], [240, 256, 256], [2.4, 2.0, 2.0]),
}
SETTINGS = ConvertSettings(suv_reference_time="acquisition", ctres_interpolation="linear")
SKIPPED = 77  # the exit status `make bench` reads as "cannot run here", after the reason


def synthetic_settings(geometry: tuple | None) -> dict:
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())["download"]["synthetic"]
    settings = {**config, "n_patients": 4}
    if geometry is not None:
        keys = ("pet_shape", "pet_spacing_mm", "ct_shape", "ct_spacing_mm")
        settings.update(dict(zip(keys, geometry, strict=True)))
    return settings


def generate(settings: dict, out_dir: Path) -> Path:
    row = next(r for r in source.list_studies(settings) if r["has_lesions"])
    study_dir = out_dir / row["study_id"]
    study_dir.mkdir(parents=True)
    source.fetch_study(settings, row, study_dir)
    return study_dir


def series_folders(study_dir: Path) -> dict[str, Path]:
    """The folder of each modality's series (dcm2niix is given one series folder at a time)."""
    folders = {}
    for path in sorted(study_dir.rglob("*")):
        if path.is_file() and path.parent.name != "truth":
            try:
                modality = pydicom.dcmread(path, stop_before_pixels=True).Modality
            except pydicom.errors.InvalidDicomError:
                continue
            folders.setdefault(modality, path.parent)
    return folders


def dcm2niix_copy(folder: Path, out: Path) -> Path:
    """dcm2niix (v1.0.20220720) orders PET slices by FrameReferenceTime and fails on the
    synthetic per-bed values; the tag carries no geometry, so a copy without it is converted."""
    copy = Path(shutil.copytree(folder, out))
    for path in copy.iterdir():
        ds = pydicom.dcmread(path)
        ds.pop("FrameReferenceTime", None)
        ds.save_as(path)
    return copy


def timed(run: Callable[[], None], repeats: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each run; CPU includes waited-for child processes."""
    runs = []
    for _ in range(repeats):
        before_wall, before = time.perf_counter(), os.times()
        run()
        after_wall, after = time.perf_counter(), os.times()
        keys = ("user", "system", "children_user", "children_system")
        cpu = sum(getattr(after, k) - getattr(before, k) for k in keys)
        runs.append((after_wall - before_wall, cpu))
    return runs


def measure(name: str, study_dir: Path, work: Path, repeats: int) -> dict:
    folders = series_folders(study_dir)
    inputs = {m: dcm2niix_copy(folders[m], work / "dcm2niix_in" / m) for m in ("CT", "PT")}
    out = work / "ours"
    outputs = {n: str(out / f"{n}.nii.gz") for n in NIFTI_NAMES}

    def ours() -> None:
        convert_study(study_dir.name, study_dir, outputs, SETTINGS)

    def theirs() -> None:
        target = work / "dcm2niix_out"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for modality, folder in inputs.items():
            subprocess.run(
                ["dcm2niix", "-z", "y", "-f", modality, "-o", str(target), str(folder)],
                check=True,
                capture_output=True,
            )

    ours_runs, theirs_runs = timed(ours, repeats), timed(theirs, repeats)
    ours_wall, ours_cpu = (min(column) for column in zip(*ours_runs, strict=True))
    theirs_wall, theirs_cpu = (min(column) for column in zip(*theirs_runs, strict=True))
    return {
        "geometry": name,
        "files": sum(1 for _ in study_dir.rglob("*.dcm")),
        "ours_first": ours_runs[0][0],
        "ours_wall": ours_wall,
        "d2n_wall": theirs_wall,
        "ours_cpu": ours_cpu,
        "d2n_cpu": theirs_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", choices=[*GEOMETRIES, "all"], default="all")
    parser.add_argument("--pet-shape", help="z,y,x (custom geometry; needs all four options)")
    parser.add_argument("--pet-spacing", help="z,y,x mm")
    parser.add_argument("--ct-shape", help="z,y,x")
    parser.add_argument("--ct-spacing", help="z,y,x mm")
    parser.add_argument("--study-dir", type=Path, help="convert this raw study instead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("dcm2niix") is None:
        print(
            "skipped: needs dcm2niix, the baseline, which is not installed "
            "(Debian: apt-get install -y dcm2niix, or `make test-tools`)",
            file=sys.stderr,
        )
        sys.exit(SKIPPED)

    custom = [args.pet_shape, args.pet_spacing, args.ct_shape, args.ct_spacing]
    if args.study_dir is not None:
        plans = {"given": args.study_dir}
    elif any(custom):
        if not all(custom):
            parser.error(
                "a custom geometry needs --pet-shape, --pet-spacing, --ct-shape, --ct-spacing"
            )
        kinds = (int, float, int, float)
        plans = {
            "custom": tuple(
                [kind(v) for v in text.split(",")] for kind, text in zip(kinds, custom, strict=True)
            )
        }
    elif args.geometry == "all":
        plans = dict(GEOMETRIES)
    else:
        plans = {args.geometry: GEOMETRIES[args.geometry]}

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        for index, (name, plan) in enumerate(plans.items()):
            work = Path(tmp) / str(index)
            if isinstance(plan, Path):
                study_dir = plan
            else:
                study_dir = generate(synthetic_settings(plan), work / "raw")
            rows.append(measure(name, study_dir, work, args.repeats))

    print(f"convert: seconds per study, fastest of {args.repeats} runs (CPU includes children);")
    print("'ours 1st' is the first run in this process (highdicom loads its standard tables once)")
    columns = ("geometry", "files", "ours 1st", "ours wall", "dcm2niix", "ratio")
    columns += ("ours CPU", "dcm2niix", "ratio")
    print("".join(f"{c:>10}" for c in columns))
    for r in rows:
        values = (r["ours_first"], r["ours_wall"], r["d2n_wall"], r["ours_wall"] / r["d2n_wall"])
        values += (r["ours_cpu"], r["d2n_cpu"], r["ours_cpu"] / r["d2n_cpu"])
        print(f"{r['geometry']:>10}{r['files']:>10}" + "".join(f"{v:>10.2f}" for v in values))


if __name__ == "__main__":
    main()
