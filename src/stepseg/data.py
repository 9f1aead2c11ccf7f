"""Training patches from a packed split: random crops, lesion oversampling, flips.

Every sample is a pure function of (seed, epoch, index): its random generator is seeded with
those three numbers, so batches are identical whatever the number of workers or their order.
Studies with lesions are drawn `lesion_oversampling` times as often as lesion-free ones, and a
share `lesion_centre_fraction` of their crops is centred near a voxel of the stored lesion index
(`lesion_centres: voxel`, so a large lesion gets more crops than a small one) or of a lesion
component drawn alike (`component`, the released code's one entry per component); then
the centre moves by a uniform whole number of voxels up to `crop_jitter` times the half-patch
along each axis (the released code: 15 of 16 slices in z, 2/3 in-plane), so that lesions are
seen anywhere in a patch, as they are in the sliding windows of inference.
A share `hot_centre_fraction` of all crops (of studies that have any) is centred on a voxel of
the stored hot index (high SUV outside lesions: brain, bladder, heart, kidneys): hard negatives,
without which the network rarely sees hot organs apart from lesions and segments them too.
Both shares come from one uniform draw (lesion from the bottom, hot from the top), so they
never overlap; with `hot_centre_fraction` 0 the draws are those of a sampler without it.

Studies smaller than the patch along an axis are padded (the volume placed at a random offset
inside the patch) with air: SUV 0, CT -1024 HU (normalised 0), no lesion.

A sample is `{"suv": float16, "ct": int16 HU, "steps": uint8, each (1, D, H, W), "study": str}`,
5 bytes a voxel; the loader's batches are the same with (B, 1, D, H, W) tensors and a list of
study names. `steps` is the crop's own step map (`stepmap.step_map` of the crop's lesion voxels,
dilated inside the crop with the study's voxel radii; all 255 for a crop without lesion voxels),
as the paper and the released code build the auxiliary targets per input crop; with
`crop_steps=False` (the plain variant, validation) only its lesion voxels (0) are meaningful.
Normalisation and the 8 target channels are computed from these where the network runs
(`device_batch`, then `channels.expand`): on a GPU they cost the host nothing, and the batch
crossing from the workers to the main process and on to the device is 5 bytes a voxel rather
than the 9 of a normalised float32 image.

Moving the bytes costs more than reading them: with torch's default per-sample loading and
collation, allocating, copying and sharing the batch took about twice the CPU time of reading
its tiles. So a worker reads a whole batch straight into one shared-memory storage and reuses
that storage once the main process has let go of it (`make_loader`, `BatchBuffers`); measured
in bench/loader.py. `BatchBuffers` and `keep_freed_memory` are the only low-level tricks here
(private torch storage calls, /proc/<pid>/maps, glibc `mallopt`); bench/loader_tricks.py
switches each off (numbers in their docstrings).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from stepseg.distributed import DistContext, rank_batches
from stepseg.names import AIR_HU
from stepseg.normalize import normalize_batch
from stepseg.presets import Preset, preset_from_settings
from stepseg.settings import TargetsSettings
from stepseg.stepmap import NEVER, step_map
from stepseg.tilestore import DTYPES, TileStore

log = logging.getLogger(__name__)

PAD_SUV = 0.0
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
TORCH_DTYPES = {name: torch.from_numpy(np.empty(0, dtype)).dtype for name, dtype in DTYPES.items()}
PREFETCH_FACTOR = 4  # batches in flight per worker
SINGLE_PROCESS = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class PatchDataset(Dataset):
    """`samples_per_epoch` random patches per epoch; call `set_epoch` before each epoch."""

    def __init__(
        self,
        lmdb_path: str | Path,
        patch_size: tuple[int, int, int],
        samples_per_epoch: int,
        lesion_oversampling: float,
        lesion_centre_fraction: float,
        seed: int,
        flips: bool = True,
        lesion_centres: str = "voxel",
        hot_centre_fraction: float = 0.0,
        crop_jitter: Sequence[float] = (0.0, 0.0, 0.0),
        crop_steps: bool = True,
    ) -> None:
        if lesion_oversampling <= 0 or not 0 <= lesion_centre_fraction <= 1:
            raise ValueError("lesion_oversampling must be > 0 and lesion_centre_fraction in [0, 1]")
        # rounded: 1 - 0.8 < 0.2 in binary floating point, yet 0.8 + 0.2 is a valid split
        if hot_centre_fraction < 0 or round(lesion_centre_fraction + hot_centre_fraction, 9) > 1:
            raise ValueError(
                "hot_centre_fraction must be in [0, 1 - lesion_centre_fraction]: "
                f"{hot_centre_fraction} with lesion_centre_fraction {lesion_centre_fraction}"
            )
        if lesion_centres not in ("voxel", "component"):
            raise ValueError(f"lesion_centres must be voxel or component, got {lesion_centres!r}")
        if len(crop_jitter) != 3 or not all(0 <= j <= 1 for j in crop_jitter):
            raise ValueError(f"crop_jitter must be 3 fractions in [0, 1], got {crop_jitter}")
        self.store = TileStore(lmdb_path)
        self.patch_size = tuple(int(n) for n in patch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.lesion_centre_fraction = float(lesion_centre_fraction)
        self.hot_centre_fraction = float(hot_centre_fraction)
        self.seed = int(seed)
        self.flips = flips
        self.jitter = tuple(
            round(j * p / 2) for j, p in zip(crop_jitter, self.patch_size, strict=True)
        )
        self.crop_steps = crop_steps
        self.epoch = 0
        self.buffers: BatchBuffers | None = None  # set in workers by `worker_init_fn`
        self.preset: Preset = preset_from_settings(
            TargetsSettings.from_mapping(self.store.meta["targets"], f"{lmdb_path} targets")
        )
        self.studies = self.store.studies
        metas = [self.store.study_meta(study) for study in self.studies]
        self.shapes = [m["shape"] for m in metas]
        # per study, what a lesion-centred crop draws its centre from: every indexed lesion voxel
        # alike, or one component alike (then one of its voxels)
        self.lesion_voxels = [m["lesion_voxels"] for m in metas]
        self.lesion_centres = [
            m["lesion_components"] if lesion_centres == "component" else [m["lesion_voxels"]]
            for m in metas
        ]
        self.hot_voxels = [m["hot_voxels"] for m in metas]
        spacings = [tuple(float(v) for v in m["spacing_zyx"]) for m in metas]
        if crop_steps:
            for spacing in set(spacings):
                self.preset.check_fits(spacing, self.patch_size)
        self.voxel_steps = [self.preset.voxel_steps(spacing) for spacing in spacings]
        weights = np.array([lesion_oversampling if m["has_lesions"] else 1.0 for m in metas])
        self.study_probabilities = weights / weights.sum()
        self.store.close()  # workers open their own handle

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's samples (new workers pick it up: the loader is not persistent)."""
        self.epoch = int(epoch)

    def sample(self, index: int) -> tuple[int, tuple[int, int, int], tuple[bool, bool, bool]]:
        """Study number, patch origin (may be negative: padding) and flips of sample `index`."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        study = int(rng.choice(len(self.studies), p=self.study_probabilities))
        shape = self.shapes[study]
        groups = self.lesion_centres[study]
        if len(groups) > 1:  # per component: one drawn alike, then one of its voxels
            lesions = groups[rng.integers(len(groups))]
        else:
            lesions = groups[0] if groups else ()
        hot = self.hot_voxels[study] if self.hot_centre_fraction else ()
        centre = None
        if len(lesions) or len(hot):
            draw = rng.random()
            if len(lesions) and draw < self.lesion_centre_fraction:
                centre = lesions[rng.integers(len(lesions))]
            elif len(hot) and draw >= 1 - self.hot_centre_fraction:
                centre = hot[rng.integers(len(hot))]
        origin = []
        for axis, (n, p) in enumerate(zip(shape, self.patch_size, strict=True)):
            if n <= p:
                origin.append(-int(rng.integers(0, p - n + 1)))
            elif centre is not None:
                shift = int(rng.integers(-self.jitter[axis], self.jitter[axis] + 1))
                origin.append(int(np.clip(int(centre[axis]) + shift - p // 2, 0, n - p)))
            else:
                origin.append(int(rng.integers(0, n - p + 1)))
        flips = tuple(bool(f) for f in rng.random(3) < 0.5) if self.flips else (False,) * 3
        return study, (origin[0], origin[1], origin[2]), flips

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: `{"suv", "ct", "steps": (1, D, H, W), "study": str}`."""
        batch = self.__getitems__([index])
        return {**{name: batch[name][0] for name in DTYPES}, "study": batch["study"][0]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """The samples `indices` as one batch, each patch read straight into its slice.

        The DataLoader calls this with a whole batch of indices. The three volumes share one
        storage; in a worker of `make_loader` it is a reused shared-memory storage
        (`BatchBuffers`), so the batch crosses to the main process without a copy and without
        fresh pages: per-sample buffers, their collation copy and fresh shared memory cost
        more CPU than reading the tiles (bench/loader.py).
        """
        shape = (len(indices), 1, *self.patch_size)
        nbytes = math.prod(shape) * sum(dtype.itemsize for dtype in TORCH_DTYPES.values())
        storage = self.buffers.storage(nbytes) if self.buffers else torch.UntypedStorage(nbytes)
        batch, offset = {}, 0
        for name, dtype in TORCH_DTYPES.items():  # one storage, the volumes one after another
            batch[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
            offset += math.prod(shape) * dtype.itemsize
        studies = []
        for k, index in enumerate(indices):
            study, origin, flips = self.sample(index)
            self._crop(study, origin, flips, {n: t[k, 0].numpy() for n, t in batch.items()})
            studies.append(self.studies[study])
        return {**batch, "study": studies}

    def _crop(
        self,
        study: int,
        origin: tuple[int, int, int],
        flips: tuple[bool, bool, bool],
        outs: Mapping[str, np.ndarray],
    ) -> None:
        """Write the patch of every volume, flipped and padded, into `outs` (one pass over the
        tiles for all three volumes), then the crop's own step map over the stored one."""
        inside = tuple(
            slice(max(o, 0), min(o + p, n))
            for o, p, n in zip(origin, self.patch_size, self.shapes[study], strict=True)
        )
        padded = any(s.stop - s.start != p for s, p in zip(inside, self.patch_size, strict=True))
        flip = tuple(slice(None, None, -1 if f else 1) for f in flips)
        region = tuple(slice(s.start - o, s.stop - o) for s, o in zip(inside, origin, strict=True))
        fills = {"suv": PAD_SUV, "ct": AIR_HU, "steps": NEVER}
        views = {}
        for name, fill in fills.items():
            if padded:
                outs[name].fill(fill)
            views[name] = outs[name][flip][region]
        self.store.read_patch(self.studies[study], inside, views)
        if self.crop_steps:
            outs["steps"][...] = step_map(outs["steps"] == 0, self.voxel_steps[study])


class BatchBuffers:
    """A DataLoader worker's batch storages in shared memory, reused once the main process has
    let go of them.

    Fresh shared memory costs as much CPU as reading the patches into it (the kernel allocates
    and zeroes every page, about 1 ms per MB), and tensors in shared memory cross to the main
    process without a copy. A storage is reused only when (1) the main process has surely
    received it: a worker's task is sent only after the main process has handed out every batch
    `prefetch_factor` of that worker's tasks older (the DataLoader deals tasks round-robin and
    keeps `prefetch_factor` per worker in flight), and (2) the main process no longer maps it
    (/proc/<pid>/maps): nothing there holds any tensor of that batch, whatever the consumer does.

    Measured (bench/loader_tricks.py: `make_loader` as training builds it, 2 synthetic studies
    of 96 x 256 x 256, 32 x 160 x 160 patches, batch 2, 2 workers, 2 shared CPUs, median of 5
    rounds): without it (the batch read into private memory, torch copies it into fresh shared
    memory to send it) 75.5 ms of CPU per patch instead of 71.9 (+5%), and a worker's peak RSS
    475 MB instead of 264. The shared storage comes from torch's private `_new_shared` (what its
    own collation calls), and `_share_fd_cpu_` gives its file descriptor, hence the file that
    /proc/<pid>/maps names.
    """

    def __init__(self, main_pid: int, min_age: int) -> None:
        self.maps = Path(f"/proc/{main_pid}/maps")
        self.min_age = min_age
        self.task = 0
        self.buffers: list[tuple[int, str, torch.UntypedStorage]] = []  # (last task, path, -)

    @staticmethod
    def supported(main_pid: int) -> bool:
        """Storages shared by file descriptor, and the main process's mappings readable."""
        strategy = torch.multiprocessing.get_sharing_strategy()
        return strategy == "file_descriptor" and os.access(f"/proc/{main_pid}/maps", os.R_OK)

    def storage(self, nbytes: int) -> torch.UntypedStorage:
        """A shared storage of `nbytes` for the worker's next task."""
        self.task += 1
        free = [
            k
            for k, (task, _, storage) in enumerate(self.buffers)
            if self.task - task >= self.min_age and storage.nbytes() == nbytes
        ]
        if free:
            mapped = self._mapped_by_main()
            for k in free:
                _, path, storage = self.buffers[k]
                if path not in mapped:
                    self.buffers[k] = (self.task, path, storage)
                    return storage
        storage = torch.UntypedStorage._new_shared(nbytes)  # as torch's collation: no copy
        fd, _ = storage._share_fd_cpu_()
        self.buffers.append((self.task, os.readlink(f"/proc/self/fd/{fd}"), storage))
        return storage

    def _mapped_by_main(self) -> set[str]:
        lines = (line.split(maxsplit=5) for line in self.maps.read_text().splitlines())
        return {fields[5] for fields in lines if len(fields) == 6}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """Collation of a batch `PatchDataset.__getitems__` already assembled: none."""
    return batch


def device_batch(
    batch: Mapping[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs of a loader batch: the normalised image (B, 2, D, H, W) float32 [PET, CT]
    and the step maps (B, 1, D, H, W) uint8, both on `device`.

    The compact stored values travel to the device and are converted and normalised there.
    """
    suv = batch["suv"].to(device, non_blocking=True)
    hu = batch["ct"].to(device, non_blocking=True)
    steps = batch["steps"].to(device, non_blocking=True)
    return normalize_batch(suv, hu), steps


def worker_init_fn(worker_id: int, main_pid: int | None = None) -> None:
    """Per worker: keep freed memory for reuse, open the read-only LMDB handle once and, when
    the worker's parent is `main_pid` (the process that built the loader iterates it, workers
    forked or spawned from it), reuse the batch storages that process let go of."""
    keep_freed_memory()
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, PatchDataset):
        info.dataset.store.open()
        if main_pid == os.getppid() and BatchBuffers.supported(main_pid):
            info.dataset.buffers = BatchBuffers(main_pid, min_age=PREFETCH_FACTOR + 1)


def keep_freed_memory() -> None:
    """Make glibc reuse freed blocks instead of returning them to the OS.

    Decoding a patch's tiles allocates MBs of temporary buffers; by default glibc maps large
    blocks anew each time and the fresh pages must be touched again. Measured as for
    `BatchBuffers` (bench/loader_tricks.py): without it 76.7 ms of CPU per patch instead of 71.9
    (+7%), the same peak RSS; the two gains overlap (without either: 76.3 ms). Other C
    libraries: no change.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        log.debug("not glibc: allocator left as it is")
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)


def make_loader(
    dataset: PatchDataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    ctx: DistContext | None = None,
) -> DataLoader:
    """Batches of `batch_size` consecutive indices of `dataset` (each index is already a random
    draw); with the `ctx` of a DDP rank, that rank's share of each of them (`rank_batches`).

    Each batch is read whole by one worker (`PatchDataset.__getitems__`). Workers are not
    persistent, so each epoch's workers see the epoch set by `set_epoch`.
    """
    batches = rank_batches(len(dataset), batch_size, ctx or SINGLE_PROCESS)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_as_is,
        num_workers=num_workers,
        worker_init_fn=partial(worker_init_fn, main_pid=os.getpid()) if num_workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=PREFETCH_FACTOR if num_workers else None,
    )
