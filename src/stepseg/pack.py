"""The pack stage: one split's studies written into an LMDB of compressed tiles
(`stepseg.tilestore` describes the layout and reads it).

A study is checked before it is stored (`stepseg.checks`: non-finite or negative SUV, implausible
CTres, a step map that is not uint8 fail the split), SUV is stored as float16 and CT as whole HU
in int16. Arrays are stored in `stepseg.names.ORIENTATION` (`stepseg.nifti.load`), whatever the
files' own, so that training sees every study as inference does. The database is built in a
temporary directory and renamed when complete (`stepseg.atomic.atomic_dir`), and `__meta__` is
written last: a killed job never leaves a valid-looking LMDB. `__meta__` also holds each study's
content digest (`study_digest`): a training state records them and is not resumed on other data
(`stepseg.train`).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from stepseg import checks, metrics, nifti
from stepseg.atomic import atomic_dir
from stepseg.codec import encode
from stepseg.errors import StudyError
from stepseg.settings import PackSettings, TargetsSettings
from stepseg.tilestore import (
    DTYPES,
    FORMAT_VERSION,
    META_KEY,
    StoreError,
    encode_record,
    iter_tiles,
    seal,
    study_meta_key,
    tile_key,
)

log = logging.getLogger(__name__)

# voxels kept per lesion component for per-component crop centres (`_component_voxels`)
COMPONENT_VOXELS = 64

FLOAT16_MAX = float(np.finfo(np.float16).max)
INT16_RANGE = (int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max))


def pack_split(
    *,
    studies: Sequence[str],
    suv_paths: Sequence[str | Path],
    ctres_paths: Sequence[str | Path],
    steps_paths: Sequence[str | Path],
    out_dir: str | Path,
    settings: PackSettings,
    target_settings: TargetsSettings,
    ct_hu_range: tuple[float, float] = checks.CT_HU_RANGE,
) -> None:
    """Write `out_dir` (an LMDB directory) holding the tiles and metadata of `studies`; a study
    with non-finite or negative SUV or implausible CTres (`stepseg.checks`) fails the split.
    `target_settings` is stored for training to build its preset."""
    if not len(studies) == len(suv_paths) == len(ctres_paths) == len(steps_paths):
        raise ValueError("studies, SUV, CTres and step-map paths must have equal lengths")
    codec, level, max_ratio = settings.codec, settings.level, settings.max_compressed_ratio
    tile_shape = settings.tile_shape
    hot_suv_min = settings.hot_suv_min
    with atomic_dir(out_dir) as tmp, _naming_write_errors(out_dir):
        map_size = _map_size(studies, suv_paths)
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True, meminit=False)
        digests: dict[str, str] = {}
        try:
            for study, suv_path, ct_path, steps_path in zip(
                studies, suv_paths, ctres_paths, steps_paths, strict=True
            ):
                volumes, meta = _load_study(
                    study,
                    (suv_path, ct_path, steps_path),
                    settings.lesion_index_max,
                    hot_suv_min,
                    settings.hot_index_max,
                    ct_hu_range,
                )
                meta_record = encode(meta, None)
                digests[study] = study_digest(volumes, meta_record)
                with env.begin(write=True) as txn:
                    for index, box in iter_tiles(meta["shape"], tile_shape):
                        tiles = {n: np.ascontiguousarray(a[box]) for n, a in volumes.items()}
                        key = tile_key(study, index)
                        txn.put(key, seal(key, encode_record(tiles, codec, level, max_ratio)))
                    key = study_meta_key(study)
                    txn.put(key, seal(key, meta_record))
                log.info(
                    "packed %s: shape %s, %d lesion voxels, %d hot non-lesion voxels",
                    study,
                    meta["shape"],
                    meta["lesion_voxel_count"],
                    meta["hot_voxel_count"],
                )
            store_meta = {
                "format_version": FORMAT_VERSION,
                "codec": codec,
                "max_compressed_ratio": max_ratio,
                "tile_shape": tile_shape,
                "dtypes": {name: np.dtype(dtype).str for name, dtype in DTYPES.items()},
                "targets": target_settings.to_dict(),
                "hot_suv_min": hot_suv_min,
                "studies": list(studies),
                "digests": digests,
            }
            with env.begin(write=True) as txn:
                txn.put(META_KEY, seal(META_KEY, encode(store_meta, None)))
            env.sync()
        finally:
            env.close()
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        log.info("LMDB of %d studies: %.1f MB", len(studies), size / 1e6)


@contextmanager
def _naming_write_errors(path: str | Path) -> Iterator[None]:
    """Raise an LMDB error inside the block again naming the database: LMDB's own text names no
    file, and on a full disk it reports the short write as `mdb_txn_commit: Input/output error`."""
    try:
        yield
    except lmdb.Error as exc:
        raise StoreError(
            path, f"writing failed ({type(exc).__name__}: {exc}); the disk may be full"
        ) from exc


def study_digest(volumes: Mapping[str, np.ndarray], meta_record: bytes) -> str:
    """SHA-256 of what training reads of a study: its volumes as stored (name, dtype, shape,
    voxels) and its metadata record. Codec and tile shape do not enter: a re-pack that only
    stores the same voxels differently keeps every digest."""
    digest = hashlib.sha256(meta_record)
    for name, array in volumes.items():
        digest.update(f"{name} {array.dtype.str} {array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _map_size(studies: Sequence[str], suv_paths: Sequence[str | Path]) -> int:
    """An upper bound of the database size: every tile stored plain (5 bytes a voxel) plus
    pickle and page overhead. LMDB files grow only as pages are used, so this costs no disk."""
    voxels = sum(
        int(np.prod(nifti.header(path, study).get_data_shape()))
        for study, path in zip(studies, suv_paths, strict=True)
    )
    return int(voxels * len(DTYPES) * 2 * 1.25) + (1 << 28)


def _load_study(
    study: str,
    paths: tuple[str | Path, str | Path, str | Path],
    index_max: int,
    hot_suv_min: float,
    hot_index_max: int,
    ct_hu_range: tuple[float, float],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Volumes and study metadata from the (SUV, CTres, steps) files at `paths`."""
    suv_path, ct_path, steps_path = (Path(p) for p in paths)
    suv = nifti.load(suv_path, study, dtype=np.float32)
    ct = nifti.load(ct_path, study)
    steps = nifti.load(steps_path, study)
    nifti.check_same_grid(study, {"SUV": (suv_path, suv), "steps": (steps_path, steps)})
    checks.check_suv_ctres(study, (suv_path, suv), (ct_path, ct), ct_hu_range)
    if not np.array_equal(steps.array, steps.array.astype(np.uint8)):
        raise StudyError(study, "step map is not uint8", steps_path)
    suv16 = _to_float16(study, suv.array, suv_path)
    ct16 = _to_int16(study, checks.air_for_padding(ct.array), ct_path)
    lesion_mask = steps.array == 0
    hot_mask = (suv.array >= hot_suv_min) & ~lesion_mask
    rng = np.random.default_rng(zlib.crc32(study.encode()))
    lesion = _voxel_index(lesion_mask, index_max, rng)
    hot = _voxel_index(hot_mask, hot_index_max, rng)
    components = _component_voxels(lesion_mask, rng)
    meta = {
        "shape": tuple(int(n) for n in suv.array.shape),
        "spacing_zyx": suv.spacing_zyx,
        "affine": suv.affine,
        "has_lesions": bool(len(lesion)),
        "lesion_voxel_count": int(lesion_mask.sum()),
        "lesion_voxels": lesion,
        "lesion_components": components,
        "hot_voxel_count": int(hot_mask.sum()),
        "hot_voxels": hot,
        "suv_max": float(suv.array.max()),
    }
    volumes = {"suv": suv16, "ct": ct16, "steps": steps.array.astype(np.uint8)}
    return volumes, meta


def _component_voxels(mask: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Per 6-connected lesion component (the released code's make_data.py), (z, y, x) uint16 of
    up to `COMPONENT_VOXELS` of its voxels (a uniform random subset): per-component crop centres
    (`train.lesion_centres: component`) reach every lesion, however small, equally often."""
    if not mask.any():
        return []
    labels, count = metrics.components(mask, 6)
    voxels = np.argwhere(labels)
    owners = labels[tuple(voxels.T)]
    order = np.argsort(owners, kind="stable")
    voxels = voxels[order]
    starts = np.searchsorted(owners[order], np.arange(1, count + 2))
    return [
        _subset(voxels[starts[k] : starts[k + 1]], COMPONENT_VOXELS, rng).astype(np.uint16)
        for k in range(count)
    ]


def _subset(voxels: np.ndarray, most: int, rng: np.random.Generator) -> np.ndarray:
    """At most `most` of `voxels`, a uniform random subset in their order."""
    if len(voxels) <= most:
        return voxels
    return voxels[np.sort(rng.choice(len(voxels), most, replace=False))]


def _voxel_index(mask: np.ndarray, index_max: int, rng: np.random.Generator) -> np.ndarray:
    """(z, y, x) of the voxels of `mask` as uint16, a uniform random subset of at most
    `index_max` in scan order: enough crop centres without storing whole organs."""
    return _subset(np.argwhere(mask), index_max, rng).astype(np.uint16)


def _to_float16(study: str, suv: np.ndarray, path: str | Path) -> np.ndarray:
    """float16 keeps SUV to a relative 5e-4 (0.03 at SUV 50); values above 65504 are clipped."""
    over = int((suv > FLOAT16_MAX).sum())
    if over:
        log.warning(
            "study %s (%s): %d SUV voxels above %.0f clipped for float16 storage",
            study,
            path,
            over,
            FLOAT16_MAX,
        )
    return np.minimum(suv, FLOAT16_MAX).astype(np.float16)


def _to_int16(study: str, ct: np.ndarray, path: str | Path) -> np.ndarray:
    """CT in whole HU (CTres is interpolated, so fractions of a HU are rounding noise)."""
    rounded = np.rint(ct.astype(np.float32))
    outside = int(((rounded < INT16_RANGE[0]) | (rounded > INT16_RANGE[1])).sum())
    if outside:
        log.warning("study %s (%s): %d CT voxels outside int16 clipped", study, path, outside)
    return np.clip(rounded, *INT16_RANGE).astype(np.int16)
