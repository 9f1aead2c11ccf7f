"""The workflow's own cost as the cohort grows: Snakemake's planning time and memory per study.

For each cohort size N (default 10, 100 and 1,014 studies, the size of the autoPET collection)
this builds a throw-away working directory with a manifest of N studies (so the manifest
checkpoint is satisfied and no data is needed) and measures, in fresh processes:

  dry run      `snakemake -n` with nothing built yet: the whole DAG of the study (N downloads,
               conversions, targets, inferences, ...)
  no-op dry    `snakemake -n` after every output exists (empty placeholders, each newer than
               its inputs)
  no-op run    a real `snakemake` rerun that finds nothing to do

Wall time and peak resident memory of Snakemake are reported, with the ratio to the smallest
cohort; a workflow whose planning is linear in N shows time ratios about N / N_smallest or below
(fixed start-up costs dominate small cohorts). Targets: dry run of 1,014 studies <= 10 s.

    .venv/bin/python bench/scale.py                 # 10, 100, 1014 studies
    .venv/bin/python bench/scale.py --sizes 10 50   # quicker
    .venv/bin/python bench/scale.py --profile       # + where the largest dry run spends its time
    .venv/bin/python bench/scale.py --repeat 3      # best of 3 runs each (a busy machine)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stepseg import manifest  # noqa: E402

SNAKEMAKE = Path(sys.executable).parent / "snakemake"

# Runs `snakemake` in a child and prints its wall time, CPU time (user + system: unlike wall time
# it does not grow when other processes compete for the cores) and peak RSS (kB on Linux): a fresh
# measuring process per call, so ru_maxrss is this Snakemake's peak and not an earlier one's.
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_kb": usage.ru_maxrss, "rc": result.returncode,
                  "output": result.stdout + result.stderr}))
"""


def snakemake_args(workdir: Path, *args: str) -> list[str]:
    return [
        str(SNAKEMAKE),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]


def measure(workdir: Path, *args: str, repeat: int = 1) -> dict:
    """The best (least) wall and CPU time of `repeat` runs: other load on the machine only ever
    adds time, so the minimum is the closest to the time on an idle machine."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, *snakemake_args(workdir, *args)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout)
        if result["rc"] != 0:
            raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{result['output'][-4000:]}")
        runs.append(result)
    return {
        "wall_s": min(r["wall_s"] for r in runs),
        "cpu_s": min(r["cpu_s"] for r in runs),
        "peak_kb": max(r["peak_kb"] for r in runs),
        "output": runs[0]["output"],
    }


def write_manifest(workdir: Path, n_studies: int, folds: int | None = None) -> None:
    """N studies of ~0.8 N patients (a quarter with a follow-up), split by patient as usual;
    with `folds` (default: `train.folds` of the working directory's config/config.yaml) >= 2
    the non-test patients are dealt into folds, as the manifest rule does."""
    if folds is None:
        config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
        folds = config["train"]["folds"]
    records = []
    patient = 0
    while len(records) < n_studies:
        visits = 2 if patient % 4 == 0 else 1
        for visit in range(min(visits, n_studies - len(records))):
            records.append(
                {
                    "study_id": f"PETCT_{patient:05d}_{visit}",
                    "patient_id": f"PETCT_{patient:05d}",
                    "has_lesions": patient % 2 == 0,
                }
            )
        patient += 1
    table = manifest.assign_splits(
        records, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0, folds=folds
    )
    manifest.write(table, workdir / "results" / "manifest.tsv")


def directory_patterns() -> list[re.Pattern]:
    """Outputs declared `directory(...)` in the rules, as regexes over paths."""
    patterns = []
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for declared in re.findall(r"directory\(\s*\"([^\"]+)\"", smk.read_text()):
            parts = re.split(r"\{[^}]+\}", declared)
            patterns.append(re.compile("[^/]+".join(re.escape(p) for p in parts) + r"\Z"))
    return patterns


def planned_files(dry_run_output: str) -> dict[str, list[str]]:
    """Every output the dry run planned -> the inputs of the job that makes it."""
    planned: dict[str, list[str]] = {}
    inputs: list[str] = []
    for line in dry_run_output.splitlines():
        line = line.strip()
        if line.startswith("input:"):
            inputs = [p.strip() for p in line[len("input:") :].split(",")]
        elif line.startswith("output:"):
            for path in line[len("output:") :].split(","):
                planned[path.strip()] = inputs
        elif line.startswith(("rule ", "checkpoint ", "localrule ", "localcheckpoint ")):
            inputs = []
    return planned


def create_placeholders(workdir: Path, dry_run_output: str) -> int:
    """Create every planned output (empty file, or folder for a directory output), each newer than
    its inputs: what a finished run leaves, as far as Snakemake's up-to-date check can tell."""
    dirs = directory_patterns()
    planned = planned_files(dry_run_output)
    depth: dict[str, int] = {}

    def depth_of(path: str) -> int:
        if path not in depth:
            depth[path] = 1 + max((depth_of(i) for i in planned.get(path, []) if i in planned),
                                  default=0)  # fmt: skip
        return depth[path]

    manifest_time = (workdir / "results" / "manifest.tsv").stat().st_mtime
    for path in planned:
        target = workdir / path
        stamp = manifest_time + depth_of(path)
        if any(p.match(path) for p in dirs):
            target.mkdir(parents=True, exist_ok=True)
            (target / ".snakemake_timestamp").touch()
            os.utime(target / ".snakemake_timestamp", (stamp, stamp))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        os.utime(target, (stamp, stamp))
    return len(planned)


def planned_jobs(output: str) -> int:
    match = re.search(r"^total\s+(\d+)$", output, flags=re.MULTILINE)
    return int(match.group(1)) if match else 0


def run_size(n_studies: int, base: Path, repeat: int) -> dict:
    workdir = base / f"n{n_studies}"
    shutil.copytree(ROOT / "config", workdir / "config")
    write_manifest(workdir, n_studies)
    dry = measure(workdir, "-n", repeat=repeat)
    jobs = planned_jobs(dry["output"])
    n_outputs = create_placeholders(workdir, dry["output"])
    noop_dry = measure(workdir, "-n", repeat=repeat)
    if "Nothing to be done" not in noop_dry["output"]:
        raise RuntimeError(
            f"N={n_studies}: the rerun is not a no-op:\n{noop_dry['output'][-3000:]}"
        )
    noop_run = measure(workdir, repeat=repeat)
    return {
        "studies": n_studies,
        "jobs": jobs,
        "outputs": n_outputs,
        "dry_s": dry["wall_s"],
        "dry_cpu_s": dry["cpu_s"],
        "dry_mb": dry["peak_kb"] / 1024,
        "noop_dry_s": noop_dry["wall_s"],
        "noop_dry_cpu_s": noop_dry["cpu_s"],
        "noop_run_s": noop_run["wall_s"],
        "noop_run_cpu_s": noop_run["cpu_s"],
        "noop_mb": max(noop_dry["peak_kb"], noop_run["peak_kb"]) / 1024,
    }


def print_table(rows: list[dict]) -> None:
    columns = [  # (header, key, format); each measured column is followed by its ratio
        ("dry run s", "dry_s", ".2f"),
        ("cpu s", "dry_cpu_s", ".2f"),
        ("peak MB", "dry_mb", ".0f"),
        ("no-op -n s", "noop_dry_s", ".2f"),
        ("cpu s", "noop_dry_cpu_s", ".2f"),
        ("no-op run s", "noop_run_s", ".2f"),
        ("cpu s", "noop_run_cpu_s", ".2f"),
        ("peak MB", "noop_mb", ".0f"),
    ]
    base = rows[0]
    header = f"{'studies':>7} {'jobs':>6}"
    for title, _, _ in columns:
        header += f" {title:>11} {'x':>5}"
    print(header + f" {'cpu ms/study':>12}")
    for r in rows:
        line = f"{r['studies']:>7} {r['jobs']:>6}"
        for _, key, fmt in columns:
            line += f" {r[key]:>11{fmt}} {r[key] / base[key]:>5.2f}"
        print(line + f" {1000 * r['dry_cpu_s'] / r['studies']:>12.1f}")
    ratio = rows[-1]["studies"] / base["studies"]
    print(f"(x = ratio to {base['studies']} studies; the last row has {ratio:.1f} x the studies)")


def is_workflow_code(filename: str) -> bool:
    return "stepseg" in filename or filename.endswith(".smk") or "/workflow/" in filename


def profile_dry_run(workdir: Path, top: int) -> None:
    """cProfile of the measured dry run (`snakemake -n`, its job listing sent to /dev/null) in this
    process: how much of it is the workflow's own code, and which workflow functions cost most."""
    from snakemake.cli import main

    profiler = cProfile.Profile()
    argv = snakemake_args(workdir, "-n")[1:]
    saved = [os.dup(1), os.dup(2)]
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        profiler.enable()
        try:
            main(argv)
        except SystemExit:
            pass
        finally:
            profiler.disable()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows = []
    own = 0.0  # time in workflow code entered from Snakemake (nested calls counted once)
    for (filename, line, name), (_, ncalls, _, cumtime, callers) in stats.stats.items():
        if is_workflow_code(filename):
            rows.append((cumtime, ncalls, f"{Path(filename).name}:{line} {name}"))
            if not any(is_workflow_code(caller[0]) for caller in callers):
                own += cumtime
    print(
        f"\nprofile of the dry run in {workdir.name}: {total:.2f} s under the profiler, of which"
        f" {own:.2f} s ({100 * own / total:.0f} %) in the workflow's own code (module code,"
        " input functions, params; the rest is Snakemake)"
    )
    print(f"{'cum s':>8} {'calls':>7}  workflow function")
    for cumtime, ncalls, where in sorted(rows, reverse=True)[:top]:
        print(f"{cumtime:>8.3f} {ncalls:>7}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1014])
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per measurement; the best one is reported"
    )
    parser.add_argument("--profile", action="store_true", help="profile the largest dry run")
    parser.add_argument("--top", type=int, default=12, help="rows of the profile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepseg-scale-") as tmp:
        rows = []
        for n in sorted(args.sizes):
            rows.append(run_size(n, Path(tmp), args.repeat))
            print(f"  measured {n} studies", file=sys.stderr)
        print_table(rows)
        largest = rows[-1]
        verdict = "meets" if largest["dry_s"] <= 10 else "MISSES"
        print(
            f"dry run of {largest['studies']} studies: {largest['dry_s']:.2f} s wall, "
            f"{largest['dry_cpu_s']:.2f} s CPU ({verdict} the target of <= 10 s wall)"
        )
        if args.profile:
            workdir = Path(tmp) / f"n{largest['studies']}-profile"
            shutil.copytree(ROOT / "config", workdir / "config")
            write_manifest(workdir, largest["studies"])
            profile_dry_run(workdir, args.top)


if __name__ == "__main__":
    main()
