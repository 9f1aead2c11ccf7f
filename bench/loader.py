"""Patch loading: our tiled LMDB loader against a naive NIfTI loader and a MONAI pipeline.

Run: .venv/bin/python bench/loader.py [--studies 3] [--depth 326] [--size 400] [--batches 150]

Synthetic studies at the autoPET geometry (400 x 400 x ~326 voxels of 2.04 x 2.04 x 3 mm): a
smooth body (torso with arms, lungs, spine, liver, bladder, brain) in constant air, noise only
inside the body (CT about 15 HU; PET multiplicative noise smoothed like a reconstruction), and
spherical lesions in half of the studies. Pure noise would not compress at all and an empty
phantom would compress trivially; real scans sit in between, like these.

Measures, in one run: the time `TileStore.read_patch` takes per patch with and without the
CRC32 check of every LMDB value; patches per second of `stepseg.data.make_loader` exactly as
training builds it (2 workers; each reads whole batches of crops as stored, SUV float16 + HU int16 +
steps uint8, into reused shared memory), of a naive loader (nibabel loads the .nii.gz files,
crops and normalises, default DataLoader) and of MONAI `LoadImaged + RandSpatialCropd`; as a
ceiling the same loader with the tile reads left out (sampling, batch storages, inter-process
transfer: everything else it does), and torch's default batching of ready-made tensors of our
payload (per-sample tensors, collation copy into fresh shared memory, transfer; no reading:
what our loader used before it read batches itself); the bytes per voxel each moves from
its workers to the main process; the CPU cost per patch of the work done where the network runs
(`data.device_batch` normalisation + 8-channel `channels.expand`; on a GPU it costs the host
nothing); bytes on disk of our LMDB, of the NIfTI files and of what the original stored
(float32, 8 targets + 2 inputs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import psutil
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from stepseg import channels, data, nifti, pack, targets, tilestore
from stepseg.normalize import normalize_batch
from stepseg.settings import PackSettings, TargetsSettings

SPACING = (3.0, 2.04, 2.04)


def synthetic_study(shape: tuple[int, int, int], seed: int, n_lesions: int):
    """(SUV float32, CT float32 HU, SEG uint8), (z, y, x), plausible whole-body anatomy."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z = (np.arange(nz) / nz)[:, None, None]
    y = ((np.arange(ny) - ny / 2) * SPACING[1])[None, :, None]
    x = ((np.arange(nx) - nx / 2) * SPACING[2])[None, None, :]
    width = 165 + 20 * np.sin(z * 5 + rng.uniform(0, 6))
    depth = 110 + 12 * np.cos(z * 4 + rng.uniform(0, 6))
    torso = (x / width) ** 2 + (y / depth) ** 2 < 1
    arm_x = width + 45
    arms = (((np.abs(x) - arm_x) / 38) ** 2 + (y / 45) ** 2 < 1) & (z > 0.35) & (z < 0.85)
    head = ((x / 75) ** 2 + (y / 95) ** 2 < 1) & (z > 0.88)
    body = (torso & (z <= 0.88)) | arms | head
    lungs = (((np.abs(x) - 0.45 * width) / (0.33 * width)) ** 2 + (y / (0.7 * depth)) ** 2 < 1) & (
        (z > 0.6) & (z < 0.82)
    )
    spine = (x / 16) ** 2 + ((y + 0.65 * depth) / 16) ** 2 < 1
    liver = (((x + 0.35 * width) / (0.4 * width)) ** 2 + (y / (0.6 * depth)) ** 2 < 1) & (
        (z > 0.5) & (z < 0.6)
    )
    bladder = ((x / 35) ** 2 + ((y - 0.3 * depth) / 30) ** 2 < 1) & (z > 0.1) & (z < 0.17)
    brain = ((x / 65) ** 2 + (y / 80) ** 2 < 1) & (z > 0.9)

    coarse = rng.normal(0, 1, (nz // 8 + 2, ny // 8 + 2, nx // 8 + 2)).astype(np.float32)
    smooth = ndimage.zoom(ndimage.gaussian_filter(coarse, 1.0), 8, order=1)[:nz, :ny, :nx]
    noise = rng.standard_normal(shape, dtype=np.float32)
    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[body] = 40 + 25 * smooth[body] + 15 * noise[body]
    for region, hu in ((lungs, -830.0), (spine, 650.0), (liver, 60.0), (bladder, 10.0)):
        inside = region & body
        ct[inside] = hu + 25 * smooth[inside] + 15 * noise[inside]
    pet_noise = ndimage.gaussian_filter(noise, 1.0) * 2.5
    suv = np.zeros(shape, dtype=np.float32)
    level = np.where(lungs, 0.4, 1.0) + np.where(liver, 1.5, 0) + np.where(brain, 7.0, 0)
    level = level + np.where(bladder, 18.0, 0)
    suv[body] = ((level + 0.2 * smooth) * (1 + 0.12 * pet_noise))[body]
    seg = np.zeros(shape, dtype=np.uint8)
    for _ in range(n_lesions):
        centre = [
            rng.uniform(0.2, 0.8) * nz,
            rng.uniform(0.4, 0.6) * ny,
            rng.uniform(0.3, 0.7) * nx,
        ]
        radius_mm = rng.uniform(4, 25)
        box = tuple(
            slice(max(int(c - radius_mm / s) - 1, 0), min(int(c + radius_mm / s) + 2, n))
            for c, s, n in zip(centre, SPACING, shape, strict=True)
        )
        grid = np.ogrid[box]
        distance = sum(
            ((g - c) * s / radius_mm) ** 2 for g, c, s in zip(grid, centre, SPACING, strict=True)
        )
        seg[box][distance < 1] = 1
        suv[box] += rng.uniform(3, 15) * np.exp(-1.5 * distance).astype(np.float32)
    return np.clip(suv, 0, None), ct, seg


def affine_for() -> np.ndarray:
    """NIfTI affine with the autoPET spacing (x, y, z columns)."""
    return np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])


class NaiveDataset(Dataset):
    """What one would write first: load the three .nii.gz files, crop, normalise."""

    def __init__(self, folders: list[Path], patch: tuple[int, int, int], n: int) -> None:
        self.folders, self.patch, self.n = folders, patch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(index)
        folder = self.folders[index % len(self.folders)]
        arrays = [
            np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj).transpose(2, 1, 0)
            for name in ("SUV", "CTres", "steps")
        ]
        start = [
            int(rng.integers(0, n - p + 1))
            for n, p in zip(arrays[0].shape, self.patch, strict=True)
        ]
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))
        suv, ct, steps = (torch.from_numpy(np.ascontiguousarray(a[box]))[None] for a in arrays)
        image = normalize_batch(suv[None], ct[None])[0]
        return {"image": image, "steps": steps}


class TransferOnly(data.PatchDataset):
    """Our loader without the tile reads: what sampling, batch storages and transfer cost."""

    def _crop(self, study, origin, flips, outs) -> None:
        """Leaves the batch storage as it is."""


class DefaultBatching(Dataset):
    """Ready-made samples of our payload, batched by torch's default collation."""

    def __init__(self, patch: tuple[int, int, int], n: int) -> None:
        self.patch, self.n = patch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {
            name: torch.zeros((1, *self.patch), dtype=getattr(torch, np.dtype(dtype).name))
            for name, dtype in tilestore.DTYPES.items()
        }


def monai_loader(folders: list[Path], patch, n: int, workers: int, batch: int) -> DataLoader:
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropd

    keys = ["suv", "ct", "steps"]
    files = [
        {
            k: str(folders[i % len(folders)] / f"{f}.nii.gz")
            for k, f in zip(keys, ("SUV", "CTres", "steps"), strict=True)
        }
        for i in range(n)
    ]
    transform = Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            RandSpatialCropd(keys=keys, roi_size=patch[::-1], random_size=False),
        ]
    )
    dataset = MonaiDataset(files, transform)
    return DataLoader(dataset, batch_size=batch, num_workers=workers)


class Rate(NamedTuple):
    patches_per_s: float
    patches: int
    bytes_per_voxel: float  # of the batches: what crosses from the workers to the main process
    cpu_ms: float  # CPU time of the main process and its workers per patch


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)  # user + system


def rate(loader, batches: int, warmup: int) -> Rate:
    """Throughput after `warmup` batches (worker start-up excluded). The CPU time per patch
    does not depend on what else runs on the machine, unlike patches per second."""
    iterator = iter(loader)
    count = 0
    for _ in range(warmup):
        next(iterator)
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    cpu = cpu_seconds(processes)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        count += len(batch["steps"])
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(processes) - cpu
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    voxels = batch["steps"][0].numel() * len(batch["steps"])
    per_voxel = sum(t.element_size() * t.numel() for t in tensors) / voxels
    return Rate(count / seconds, count, per_voxel, cpu * 1000 / count)


def patch_read_ms(lmdb_path: Path, patch, reads: int, verify: bool) -> float:
    """Milliseconds per patch of `TileStore.read_patch` in this process, the same random boxes
    for both settings; `verify` = CRC32 of every value read, as training does."""
    reader = tilestore.TileStore(lmdb_path, verify_checksums=verify)
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(reads):
        study = reader.studies[int(rng.integers(len(reader.studies)))]
        shape = reader.study_meta(study)["shape"]
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch, strict=True)]
        boxes.append((study, tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))))
    best = float("inf")
    for _ in range(3):  # the fastest of three passes: the least disturbed by other jobs
        t = time.perf_counter()
        for study, box in boxes:
            reader.read_patch(study, box)
        best = min(best, (time.perf_counter() - t) * 1000 / reads)
    return best


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pack_folders(
    folders: list[Path], lmdb_path: Path, settings: PackSettings, target_settings: TargetsSettings
) -> None:
    """Pack study folders (SUV, CTres and steps NIfTI files each) into one LMDB."""
    pack.pack_split(
        studies=[f.name for f in folders],
        suv_paths=[f / "SUV.nii.gz" for f in folders],
        ctres_paths=[f / "CTres.nii.gz" for f in folders],
        steps_paths=[f / "steps.nii.gz" for f in folders],
        out_dir=lmdb_path,
        settings=settings,
        target_settings=target_settings,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--depth", type=int, default=326, help="slices of the first study")
    parser.add_argument("--size", type=int, default=400, help="in-plane voxels")
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 160, 160))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=150, help="timed batches of our loader")
    parser.add_argument("--slow-batches", type=int, default=4, help="timed batches of baselines")
    parser.add_argument("--reads", type=int, default=100, help="patches read in one process")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--tile", type=int, nargs=3, default=(16, 64, 64))
    parser.add_argument("--codec", default="gzip")
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    args = parser.parse_args()
    data.keep_freed_memory()  # as in our workers; forked baseline workers inherit it too
    patch = tuple(args.patch)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stepseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = TargetsSettings.from_mapping({"preset": args.preset})
    try:
        folders, voxels = [], 0
        t0 = time.perf_counter()
        target_seconds = 0.0
        for k in range(args.studies):
            shape = (args.depth + 12 * k - 12 * (args.studies // 2), args.size, args.size)
            folder = work / f"study{k}"
            folders.append(folder)
            voxels += int(np.prod(shape))
            if (folder / "steps.nii.gz").exists():
                continue
            suv, ct, seg = synthetic_study(shape, seed=k, n_lesions=6 if k % 2 == 0 else 0)
            for name, array, dtype in (
                ("SUV", suv, np.float32),
                ("CTres", ct, np.float32),
                ("SEG", seg, np.uint8),
            ):
                nifti.save(
                    nifti.Volume(array, affine_for()), folder / f"{name}.nii.gz", dtype=dtype
                )
            t = time.perf_counter()
            targets.write_study_targets(
                f"study{k}",
                folder / "SEG.nii.gz",
                folder / "SUV.nii.gz",
                folder / "CTres.nii.gz",
                folder / "steps.nii.gz",
                folder / "qc.png",
                settings,
            )
            target_seconds += time.perf_counter() - t
        print(
            f"generated {args.studies} studies in {time.perf_counter() - t0:.0f} s "
            f"(step maps incl. I/O: {target_seconds:.1f} s)"
        )
        lmdb_path = work / "train.lmdb"
        t = time.perf_counter()
        pack_folders(
            folders,
            lmdb_path,
            PackSettings.from_mapping(
                {"codec": args.codec, "level": args.level, "tile_shape": list(args.tile)}
            ),
            settings,
        )
        pack_seconds = time.perf_counter() - t
        checked_ms = patch_read_ms(lmdb_path, patch, args.reads, verify=True)
        unchecked_ms = patch_read_ms(lmdb_path, patch, args.reads, verify=False)

        n_ours = args.batches * args.batch + 4 * args.batch
        dataset = data.PatchDataset(lmdb_path, patch, n_ours, 2.0, 0.5, seed=0)
        ours = rate(data.make_loader(dataset, args.batch, args.workers), args.batches, 4)
        transfer = TransferOnly(lmdb_path, patch, n_ours, 2.0, 0.5, seed=0)
        ceiling = rate(data.make_loader(transfer, args.batch, args.workers), args.batches, 4)
        default_loader = DataLoader(
            DefaultBatching(patch, n_ours), batch_size=args.batch, num_workers=args.workers
        )
        default = rate(default_loader, args.batches, 4)
        n_slow = (args.slow_batches + 1) * args.batch
        naive_loader = DataLoader(
            NaiveDataset(folders, patch, n_slow), batch_size=args.batch, num_workers=args.workers
        )
        naive = rate(naive_loader, args.slow_batches, 1)
        monai = rate(
            monai_loader(folders, patch, n_slow, args.workers, args.batch), args.slow_batches, 1
        )

        batch = next(iter(data.make_loader(dataset, 4, 0)))
        cpu = torch.device("cpu")
        normalize_ms, expand_ms = [], []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the cost in one core's time, unblurred by other jobs' load
        for _ in range(5):
            t = time.perf_counter()
            image, steps = data.device_batch(batch, cpu)
            normalize_ms.append((time.perf_counter() - t) * 1000 / 4)
            t = time.perf_counter()
            channels.expand(steps, image, dataset.preset)
            expand_ms.append((time.perf_counter() - t) * 1000 / 4)
        torch.set_num_threads(threads)

        lmdb_bytes = directory_bytes(lmdb_path)
        nifti_bytes = sum(
            (f / f"{name}.nii.gz").stat().st_size
            for f in folders
            for name in ("SUV", "CTres", "SEG")
        )
        raw_bytes = voxels * (8 + 2) * 4
        print(
            f"\npatch {patch}, batch {args.batch}, {args.workers} workers, "
            f"{torch.get_num_threads()} torch threads, preset {args.preset}, "
            f"tiles {tuple(args.tile)}, codec {args.codec} level {args.level}; "
            f"pack {pack_seconds:.0f} s"
        )
        print(
            f"{'loader':<40}{'patches/s':>10}{'vs naive':>10}{'bytes/voxel':>13}"
            f"{'CPU ms/patch':>14}"
        )
        for name, value in (
            ("stepseg make_loader (LMDB)", ours),
            ("same without tile reads (ceiling)", ceiling),
            ("torch default batching, no reading", default),
            ("naive nibabel + crop + normalise", naive),
            ("MONAI LoadImaged+RandSpatialCropd", monai),
        ):
            print(
                f"{name:<40}{value.patches_per_s:>10.1f}"
                f"{value.patches_per_s / naive.patches_per_s:>9.1f}x"
                f"{value.bytes_per_voxel:>13.0f}{value.cpu_ms:>14.1f}"
            )
        cores = len(os.sched_getaffinity(0))
        print(
            f"ours timed over {ours.patches} patches: "
            f"{ours.patches_per_s / ceiling.patches_per_s:.0%} of the ceiling's patches/s, "
            f"needing {ours.cpu_ms / ceiling.cpu_ms:.1f}x its CPU time; {cores} cores kept busy "
            f"would give {1000 * cores / ours.cpu_ms:.0f}/s.\n"
            "CPU ms/patch: of the main process and its workers while timed; other jobs' load "
            "slows patches/s much more than this.\n"
            "bytes/voxel: what crosses from the workers to the main process. Ours, the "
            "ceiling and default batching: the stored SUV float16 + HU int16\n"
            "+ steps uint8, normalised where the network runs. Naive: the normalised float32 "
            "[PET, CT] image + uint8 steps,\n"
            "as a user's first loader would return them. MONAI: LoadImaged's float32 SUV, CT "
            "and steps, not normalised."
        )
        print(
            f"\ntile reads in one process ({args.reads} random patches, fastest of 3 passes): "
            f"{checked_ms:.1f} ms per patch with the CRC32 of every value checked, "
            f"{unchecked_ms:.1f} ms unchecked (+{checked_ms / unchecked_ms - 1:.0%})"
        )
        print(
            f"\nwhere the network runs, on one core of this CPU (on a GPU the host pays nothing): "
            f"normalisation {np.median(normalize_ms):.1f} ms + 8-channel expansion "
            f"{np.median(expand_ms):.1f} ms per patch"
        )
        print(f"\n{'storage':<34}{'MB':>12}{'vs raw':>10}")
        for name, value in (
            ("stepseg LMDB", lmdb_bytes),
            ("NIfTI .nii.gz (SUV, CTres, SEG)", nifti_bytes),
            ("raw float32 8 targets + 2 inputs", raw_bytes),
        ):
            print(f"{name:<34}{value / 1e6:>12.1f}{value / raw_bytes:>10.4f}")
        print(f"LMDB is 1/{raw_bytes / lmdb_bytes:.0f} of raw float32")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
