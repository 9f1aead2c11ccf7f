"""What data.py's two low-level tricks buy the training loader, each switched off in turn.

Run: .venv/bin/python bench/loader_tricks.py [--studies 2] [--depth 96] [--size 256]

The tricks: `data.keep_freed_memory` (glibc `mallopt` in every worker, so that the MBs a patch's
tile decoding allocates are reused rather than mapped anew) and `data.BatchBuffers` (a worker
reads each batch into a shared-memory storage it reuses once the main process no longer maps it:
private torch storage calls and /proc/<pid>/maps). Without the latter a batch is read into
private memory and torch copies it into fresh shared memory to send it.

Every variant runs `data.make_loader` exactly as training builds it, in a fresh process, on the
same LMDB and the same samples, in rounds (all variants once per round) so that load from other
jobs falls on all of them. Printed per variant: patches per second, CPU milliseconds per patch
(main process and workers; other jobs' load changes this much less than patches/s) as the median
over rounds, and the peak RSS of the main process and of the largest worker.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import affine_for, cpu_seconds, pack_folders, synthetic_study

from stepseg import data, nifti, targets
from stepseg.settings import PackSettings, TargetsSettings

VARIANTS = {
    "as is": (True, True),
    "no mallopt": (False, True),
    "no batch buffers": (True, False),
    "neither": (False, False),
}


def build_lmdb(work: Path, studies: int, depth: int, size: int, preset: str) -> Path:
    """A packed split of synthetic studies (bench/loader.py's anatomy), half with lesions."""
    folders = []
    for k in range(studies):
        folder = work / f"study{k}"
        folders.append(folder)
        suv, ct, seg = synthetic_study((depth, size, size), seed=k, n_lesions=6 * (k % 2 == 0))
        for name, array in (("SUV", suv), ("CTres", ct), ("SEG", seg)):
            nifti.save(nifti.Volume(array, affine_for()), folder / f"{name}.nii.gz")
        targets.write_study_targets(
            f"study{k}",
            *(folder / f"{n}.nii.gz" for n in ("SEG", "SUV", "CTres", "steps")),
            folder / "qc.png",
            TargetsSettings.from_mapping({"preset": preset}),
        )
    lmdb_path = work / "train.lmdb"
    pack_folders(
        folders,
        lmdb_path,
        PackSettings.from_mapping({"codec": "gzip", "level": 1, "tile_shape": [16, 64, 64]}),
        TargetsSettings.from_mapping({"preset": preset}),
    )
    return lmdb_path


def measure(lmdb_path: Path, variant: str, batches: int, batch: int, workers: int) -> dict:
    """One variant in this process: one epoch of the training loader, 4 batches of warm-up."""
    mallopt, buffers = VARIANTS[variant]
    if not mallopt:
        data.keep_freed_memory = lambda: None  # forked workers inherit the switch
    if not buffers:
        data.BatchBuffers.supported = staticmethod(lambda main_pid: False)
    warmup = 4
    # spare batches: the workers are still alive when the timed ones are done
    samples = (batches + 2 * warmup) * batch
    dataset = data.PatchDataset(lmdb_path, (32, 160, 160), samples, 2.0, 0.5, seed=0)
    iterator = iter(data.make_loader(dataset, batch, workers))
    for _ in range(warmup):
        next(iterator)
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    cpu = cpu_seconds(processes)
    start = time.perf_counter()
    patches = sum(len(next(iterator)["study"]) for _ in range(batches))
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(processes) - cpu
    del iterator  # workers exit and are waited for: their peak RSS counts below
    return {
        "patches_per_s": patches / seconds,
        "cpu_ms": cpu * 1000 / patches,
        "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--depth", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=60, help="timed batches per variant")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--lmdb", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child: one measurement, as JSON
        print(json.dumps(measure(args.lmdb, args.variant, args.batches, args.batch, args.workers)))
        return
    with tempfile.TemporaryDirectory(prefix="stepseg-tricks-") as tmp:
        lmdb_path = build_lmdb(Path(tmp), args.studies, args.depth, args.size, args.preset)
        results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name in VARIANTS:
                child = [sys.executable, __file__, "--variant", name, "--lmdb", str(lmdb_path)]
                child += ["--batches", str(args.batches), "--batch", str(args.batch)]
                child += ["--workers", str(args.workers)]
                done = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)
                results[name].append(json.loads(done.stdout.splitlines()[-1]))
    print(
        f"{args.studies} studies {args.depth}x{args.size}x{args.size}, patch 32x160x160, "
        f"batch {args.batch}, {args.workers} workers, {args.batches} batches, "
        f"median of {args.rounds} rounds; {psutil.cpu_count()} CPUs"
    )
    print(f"{'variant':<18}{'patches/s':>10}{'CPU ms/patch':>14}{'main MB':>9}{'worker MB':>11}")
    for name, runs in results.items():
        row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        cpu_all = "/".join(f"{run['cpu_ms']:.0f}" for run in runs)
        print(
            f"{name:<18}{row['patches_per_s']:>10.1f}{row['cpu_ms']:>14.1f}"
            f"{row['main_mb']:>9.0f}{row['worker_mb']:>11.0f}   (CPU ms per round {cpu_all})"
        )


if __name__ == "__main__":
    main()
