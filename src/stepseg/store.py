"""One split's studies in an LMDB of compressed 3-D tiles, read patch by patch.

Layout (format version 4): the volumes of a study (SUV as float16, CT as int16 HU, step map as
uint8) are cut into tiles of `tile_shape` (z, y, x); the three tiles at one position form one
LMDB value under the key `{study}/{tz}/{ty}/{tx}`: a compressed pickle (compress-pickle, codec
configurable) of `{"suv": ..., "ct": ..., "steps": ...}`, each a 3-D array or, for a constant
tile (air), its value. Reading a 32x160x160 patch therefore decompresses only the tiles it
touches, never whole slices, and costs one look-up and one unpickle per position for all three
volumes: per-volume values (version 2) took three, and the loader a third more CPU time per patch
(bench/loader.py: 14-16 ms against 11-12 ms, of which 7-8 ms is the DataLoader's own transfer).
`{study}/meta` holds the study's shape, spacing, affine, a lesion voxel index and a hot voxel index
(SUV >= `hot_suv_min` outside lesions: the physiological uptake that crops learn to reject),
`__meta__` the format version, codec, tile shape, dtypes, normalisation and target settings; both
metadata records are uncompressed pickles, so they are readable before the codec is known.

Every value is stored behind the CRC32 of its key and its bytes (`seal`), verified on every read
(`unseal`): LMDB checks its own pages but not the values, and a flipped byte inside a plain tile
would otherwise be read as a voxel off by thousands of HU, a NaN or a negative SUV. Covering the
key also refuses a value that landed under another key. The check costs about 0.8 ms per MB
(bench/loader.py prints the read time with and without it).

Values are unpickled by a restricted unpickler that accepts numpy arrays, dtypes and scalars and
plain Python types only, so a tampered database cannot run code. The database is built in a
temporary directory and renamed when complete (`stepseg.atomic.atomic_dir`), and `__meta__` is
written last: a killed job never leaves a valid-looking LMDB.
"""

from __future__ import annotations

import bz2
import io
import itertools
import logging
import lzma
import os
import pickle
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import compress_pickle
import lmdb
import nibabel as nib
import numpy as np
from compress_pickle.picklers.base import BasePicklerIO
from compress_pickle.picklers.registry import get_known_picklers, register_pickler

from stepseg import LMDB_FORMAT_VERSION, checks, nifti
from stepseg.atomic import atomic_dir
from stepseg.errors import StudyError

log = logging.getLogger(__name__)

FORMAT_VERSION = LMDB_FORMAT_VERSION
META_KEY = b"__meta__"
DTYPES = {"suv": np.float16, "ct": np.int16, "steps": np.uint8}
FLOAT16_MAX = float(np.finfo(np.float16).max)
INT16_RANGE = (int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max))
PICKLER = "stepseg_restricted"
CHECKSUM = struct.Struct("<I")  # CRC32 of key and payload, in front of the payload
REPACK = "delete it and re-pack (the pack rule rebuilds it)"


# compress-pickle codecs and the keyword that sets their compression level
def _gunzip(data: bytes | memoryview) -> bytes:
    """One-shot gunzip into a buffer of the exact size (the gzip trailer's ISIZE field)."""
    size = int.from_bytes(data[-4:], "little")
    return zlib.decompress(data, wbits=31, bufsize=max(size, 1))


LEVEL_KEYWORD = {"gzip": "compresslevel", "bz2": "compresslevel", "lzma": "preset"}
DECOMPRESS = {"gzip": _gunzip, "bz2": bz2.decompress, "lzma": lzma.decompress, None: bytes}
MAGIC = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "lzma": b"\xfd7zXZ"}
CODECS = ["gzip", "bz2", "lzma", None]

Box = tuple[slice, slice, slice]


class StoreError(RuntimeError):
    """The database as a whole is unusable (missing, empty, corrupt, wrong version)."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"LMDB {self.path}: {message}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python values; any other global is refused."""

    ALLOWED = frozenset(
        (module, name)
        for core in ("numpy._core", "numpy.core")
        for module, name in (
            (f"{core}.multiarray", "_reconstruct"),
            (f"{core}.multiarray", "scalar"),
            (f"{core}.numeric", "_frombuffer"),
        )
    ) | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(module, name)


class _RestrictedPicklerIO(BasePicklerIO):
    """compress-pickle adapter: plain pickle (protocol 5) out, `RestrictedUnpickler` in."""

    def dump(self, obj: Any, stream: IO[bytes], **kwargs: Any) -> None:
        stream.write(pickle.dumps(obj, protocol=5, **kwargs))

    def load(self, stream: IO[bytes], **kwargs: Any) -> Any:
        return RestrictedUnpickler(stream, **kwargs).load()


if PICKLER not in get_known_picklers():
    register_pickler(PICKLER, _RestrictedPicklerIO)


def encode(obj: Any, codec: str | None, level: int | None = None) -> bytes:
    """Compressed pickle of `obj` (compress-pickle; codec None = a plain pickle)."""
    if codec not in DECOMPRESS:
        raise ValueError(f"unsupported codec {codec!r}; choose one of {CODECS}")
    kwargs = {LEVEL_KEYWORD[codec]: level} if level is not None and codec in LEVEL_KEYWORD else {}
    return compress_pickle.dumps(obj, compression=codec, pickler_method=PICKLER, **kwargs)


def encode_record(
    tiles: Mapping[str, np.ndarray], codec: str | None, level: int | None, max_ratio: float
) -> bytes:
    """The value of one tile position: `{name: tile}` with constant tiles replaced by their value
    (a Python number), compressed with `codec` if that takes it to at most `max_ratio` of the
    plain pickle, else a plain pickle.

    Inflating a position that holds body noise takes about 50 times as long as copying it and
    saves at most half of its bytes; near-constant positions (air) shrink 20-100x and inflate
    quickly. The choice is made for the position as a whole: a step tile inside the body is then
    stored plain (it would compress well), which costs some disk but less time than inflating it.
    """
    record: dict[str, Any] = {}
    for name, tile in tiles.items():
        flat = tile.reshape(-1)
        record[name] = flat[0].item() if flat.size and (flat == flat[0]).all() else tile
    plain = encode(record, None)
    if codec is None or all(not isinstance(v, np.ndarray) for v in record.values()):
        return plain
    packed = encode(record, codec, level)
    return packed if len(packed) <= max_ratio * len(plain) else plain


def decode(data: bytes | memoryview) -> Any:
    """Inverse of `encode` through the restricted unpickler; the codec is read off the magic
    bytes, so plain and compressed values can sit side by side.

    Compressed values are the files compress-pickle writes (gzip, bz2 or xz around a pickle),
    decompressed in one call rather than through compress-pickle's file object, which reads in
    small chunks and takes about twice as long per tile.
    """
    head = bytes(data[:6])
    for codec, magic in MAGIC.items():
        if head.startswith(magic):
            return RestrictedUnpickler(io.BytesIO(DECOMPRESS[codec](data))).load()
    return RestrictedUnpickler(io.BytesIO(data)).load()


class ChecksumError(ValueError):
    """A stored value is not the one written under its key (flipped bytes, another key's)."""


def seal(key: bytes, payload: bytes) -> bytes:
    """The value stored under `key`: the CRC32 of key and payload, then the payload."""
    return CHECKSUM.pack(zlib.crc32(payload, zlib.crc32(key))) + payload


def unseal(key: bytes, value: bytes) -> memoryview:
    """The payload of a value read under `key`, after checking its CRC32 (no copy)."""
    view = memoryview(value)
    if len(view) < CHECKSUM.size:
        raise ChecksumError(f"value of {len(view)} bytes has no checksum")
    (stored,) = CHECKSUM.unpack_from(view)
    payload = view[CHECKSUM.size :]
    computed = zlib.crc32(payload, zlib.crc32(key))
    if stored != computed:
        raise ChecksumError(
            f"checksum mismatch (stored CRC32 {stored:08x}, computed {computed:08x})"
        )
    return payload


def tile_grid(shape: Sequence[int], tile_shape: Sequence[int]) -> tuple[int, int, int]:
    """Number of tiles along (z, y, x)."""
    z, y, x = (-(-int(n) // int(t)) for n, t in zip(shape, tile_shape, strict=True))
    return (z, y, x)


def tile_key(study: str, index: Sequence[int]) -> bytes:
    return b"%s/%d/%d/%d" % (study.encode(), index[0], index[1], index[2])


def study_meta_key(study: str) -> bytes:
    return f"{study}/meta".encode()


def pack_split(
    studies: Sequence[str],
    suv_paths: Sequence[str | Path],
    ctres_paths: Sequence[str | Path],
    steps_paths: Sequence[str | Path],
    out_dir: str | Path,
    pack_settings: dict[str, Any],
    target_settings: dict[str, Any],
    ct_hu_range: tuple[float, float] = checks.CT_HU_RANGE,
) -> None:
    """Write `out_dir` (an LMDB directory) holding the tiles and metadata of `studies`; a study
    with non-finite or negative SUV or implausible CTres (`stepseg.checks`) fails the split."""
    if not len(studies) == len(suv_paths) == len(ctres_paths) == len(steps_paths):
        raise ValueError("studies, SUV, CTres and step-map paths must have equal lengths")
    codec = pack_settings.get("codec", "gzip")
    level = pack_settings.get("level")
    max_ratio = float(pack_settings.get("max_compressed_ratio", 0.05))
    tile_shape = tuple(int(t) for t in pack_settings.get("tile_shape", (16, 64, 64)))
    index_max = int(pack_settings.get("lesion_index_max", 4096))
    hot_suv_min = float(pack_settings.get("hot_suv_min", 3.0))
    hot_index_max = int(pack_settings.get("hot_index_max", 4096))
    with atomic_dir(out_dir) as tmp:
        env = lmdb.open(str(tmp), map_size=_map_size(suv_paths), subdir=True, meminit=False)
        try:
            for study, suv_path, ct_path, steps_path in zip(
                studies, suv_paths, ctres_paths, steps_paths, strict=True
            ):
                volumes, meta = _load_study(
                    study,
                    (suv_path, ct_path, steps_path),
                    index_max,
                    hot_suv_min,
                    hot_index_max,
                    ct_hu_range,
                )
                with env.begin(write=True) as txn:
                    for index, box in iter_tiles(meta["shape"], tile_shape):
                        tiles = {n: np.ascontiguousarray(a[box]) for n, a in volumes.items()}
                        key = tile_key(study, index)
                        txn.put(key, seal(key, encode_record(tiles, codec, level, max_ratio)))
                    key = study_meta_key(study)
                    txn.put(key, seal(key, encode(meta, None)))
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
                "normalisation": {
                    "ct": "(clip(HU, -1000, 1000) + 1000) / 500",
                    "pet": "z(log2(SUV + 1)) / 2 + 1, z over SUV > 0.14, std >= 0.01",
                },
                "targets": dict(target_settings),
                "hot_suv_min": hot_suv_min,
                "studies": list(studies),
            }
            with env.begin(write=True) as txn:
                txn.put(META_KEY, seal(META_KEY, encode(store_meta, None)))
            env.sync()
        finally:
            env.close()
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        log.info("LMDB of %d studies: %.1f MB", len(studies), size / 1e6)


def _map_size(suv_paths: Sequence[str | Path]) -> int:
    """An upper bound of the database size: every tile stored plain (5 bytes a voxel) plus
    pickle and page overhead. LMDB files grow only as pages are used, so this costs no disk."""
    voxels = sum(int(np.prod(nib.load(p).shape)) for p in suv_paths if Path(p).is_file())
    return int(voxels * len(DTYPES) * 2 * 1.25) + (1 << 28)


def iter_tiles(shape: Sequence[int], tile_shape: Sequence[int]) -> Any:
    """(tile index, box) for every tile of a volume, in key order."""
    for index in itertools.product(*(range(n) for n in tile_grid(shape, tile_shape))):
        yield (
            index,
            tuple(
                slice(i * t, min((i + 1) * t, n))
                for i, t, n in zip(index, tile_shape, shape, strict=True)
            ),
        )


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
    ct16 = _to_int16(study, ct.array, ct_path)
    lesion_mask = steps.array == 0
    hot_mask = (suv.array >= hot_suv_min) & ~lesion_mask
    rng = np.random.default_rng(zlib.crc32(study.encode()))
    lesion = _voxel_index(lesion_mask, index_max, rng)
    hot = _voxel_index(hot_mask, hot_index_max, rng)
    meta = {
        "shape": tuple(int(n) for n in suv.array.shape),
        "spacing_zyx": suv.spacing_zyx,
        "affine": suv.affine,
        "has_lesions": bool(len(lesion)),
        "lesion_voxel_count": int(lesion_mask.sum()),
        "lesion_voxels": lesion,
        "hot_voxel_count": int(hot_mask.sum()),
        "hot_voxels": hot,
        "suv_max": float(suv.array.max()),
    }
    volumes = {"suv": suv16, "ct": ct16, "steps": steps.array.astype(np.uint8)}
    return volumes, meta


def _voxel_index(mask: np.ndarray, index_max: int, rng: np.random.Generator) -> np.ndarray:
    """(z, y, x) of the voxels of `mask` as uint16, a uniform random subset of at most
    `index_max` in scan order: enough crop centres without storing whole organs."""
    voxels = np.argwhere(mask)
    if len(voxels) > index_max:
        voxels = voxels[np.sort(rng.choice(len(voxels), index_max, replace=False))]
    return voxels.astype(np.uint16)


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


_ENVIRONMENTS: dict[tuple[str, int], lmdb.Environment] = {}


class TileStore:
    """Read-only access to a packed split: `meta`, `study_meta(study)`, `read_patch(study, box)`.

    The LMDB environment is opened lazily, read-only and without a lock file, once per process:
    a store created in the parent and used in a forked DataLoader worker opens its own handle.
    `verify_checksums=False` skips the CRC32 of each value; only bench/loader.py uses it, to
    show what the check costs.
    """

    def __init__(self, path: str | Path, verify_checksums: bool = True) -> None:
        self.path = Path(path)
        self.verify_checksums = verify_checksums
        self._realpath = os.path.realpath(self.path)
        self._meta: dict[str, Any] | None = None
        self._study_meta: dict[str, dict[str, Any]] = {}

    def open(self) -> lmdb.Environment:
        """The environment of this process (opened on first use after start or fork).

        One handle per (directory, process) is shared by all stores: LMDB refuses to open the
        same environment twice in one process.
        """
        key = (self._realpath, os.getpid())
        env = _ENVIRONMENTS.get(key)
        if env is None:
            for inherited in [k for k in _ENVIRONMENTS if k[0] == key[0]]:
                # a handle of the parent process, inherited by fork: unusable here, and LMDB
                # refuses a second open while it exists; closing it only affects this process
                _ENVIRONMENTS.pop(inherited).close()
            if not (self.path / "data.mdb").is_file():
                raise StoreError(self.path, "missing or not an LMDB directory (no data.mdb)")
            try:
                env = lmdb.open(
                    str(self.path),
                    readonly=True,
                    lock=False,
                    readahead=False,
                    meminit=False,
                    subdir=True,
                )
            except lmdb.Error as exc:
                raise StoreError(self.path, f"cannot open ({exc})") from exc
            _ENVIRONMENTS[key] = env
        return env

    def close(self) -> None:
        """Close this process's handle (e.g. before forking workers); reopened on next use."""
        env = _ENVIRONMENTS.pop((self._realpath, os.getpid()), None)
        if env is not None:
            env.close()

    def _get(self, key: bytes) -> bytes | None:
        try:
            with self.open().begin(buffers=False) as txn:
                return txn.get(key)
        except lmdb.Error as exc:
            raise StoreError(self.path, f"cannot read key {key!r} ({exc})") from exc

    @property
    def meta(self) -> dict[str, Any]:
        """Store-wide metadata; refuses empty, corrupt or foreign-version databases."""
        if self._meta is None:
            data = self._get(META_KEY)
            if data is None:
                raise StoreError(self.path, "no __meta__ record: empty or incompletely written")
            try:
                payload = unseal(META_KEY, data)
            except ChecksumError as exc:
                version = _unsealed_version(data)
                if version is not None and version != FORMAT_VERSION:
                    raise self._version_error(version) from exc
                raise StoreError(self.path, f"__meta__ record: {exc}; {REPACK}") from exc
            meta = self._decode_or_fail(payload, "__meta__ record")
            if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
                version = meta.get("format_version") if isinstance(meta, dict) else None
                raise self._version_error(version)
            self._meta = meta
        return self._meta

    def _version_error(self, version: Any) -> StoreError:
        return StoreError(
            self.path,
            f"format version {version}, expected {FORMAT_VERSION}: written by another "
            f"stepseg version; {REPACK}",
        )

    def _payload(self, key: bytes, value: bytes, what: str, study: str = "") -> memoryview:
        """The checked payload of `value` (read under `key`); a mismatch names `what`."""
        if not self.verify_checksums:
            return memoryview(value)[CHECKSUM.size :]
        try:
            return unseal(key, value)
        except ChecksumError as exc:
            self._fail(study, f"{what}: {exc}: the LMDB is corrupt; {REPACK}")

    def _decode_or_fail(self, data: Any, what: str, study: str = "") -> Any:
        try:
            return decode(data)
        except Exception as exc:
            self._fail(study, f"{what} cannot be decoded ({type(exc).__name__}: {exc})")

    def _fail(self, study: str, message: str) -> NoReturn:
        if study:
            raise StudyError(study, message, self.path)
        raise StoreError(self.path, message)

    @property
    def studies(self) -> list[str]:
        return list(self.meta["studies"])

    def study_meta(self, study: str) -> dict[str, Any]:
        """Shape, spacing, affine, has_lesions and lesion voxel index of one study."""
        if study not in self._study_meta:
            key = study_meta_key(study)
            data = self._get(key)
            if data is None:
                raise StudyError(study, "not in this LMDB (no metadata record)", self.path)
            payload = self._payload(key, data, "metadata record", study)
            self._study_meta[study] = self._decode_or_fail(payload, "metadata record", study)
        return self._study_meta[study]

    def read_patch(
        self, study: str, box: Box, outs: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The voxels of `box` (three slices inside the volume) of the volumes of `study`.

        `outs` maps volume names to the arrays that receive them (all three are read when it is
        None); each may be any view, e.g. a flipped one, so a loader gets flips and padding
        without another copy. Every tile position is looked up and unpickled once for all the
        volumes, and its source and destination slices are computed once.
        """
        shape = self.study_meta(study)["shape"]
        extent = tuple(s.stop - s.start for s in box)
        if any(
            s.start < 0 or s.stop > n or s.start >= s.stop for s, n in zip(box, shape, strict=True)
        ):
            raise StudyError(study, f"box {box} outside volume {shape}", self.path)
        if outs is None:
            outs = {name: np.empty(extent, dtype) for name, dtype in DTYPES.items()}
        for name, out in outs.items():
            if name not in DTYPES:
                raise KeyError(f"unknown volume {name!r}; stored: {sorted(DTYPES)}")
            if out.shape != extent or out.dtype != DTYPES[name]:
                raise ValueError(
                    f"{name} out has {out.shape} {out.dtype}, need {extent} {DTYPES[name]}"
                )
        targets = [(name, out, np.dtype(DTYPES[name])) for name, out in outs.items()]
        zs, ys, xs = (
            _axis_tiles(s.start, s.stop, t, n)
            for s, t, n in zip(box, self.meta["tile_shape"], shape, strict=True)
        )
        positions = [  # (key, source slices in the tile, destination slices, tile shape)
            (tile_key(study, (z[0], y[0], x[0])), *zip(z[1:], y[1:], x[1:], strict=True))
            for z in zs
            for y in ys
            for x in xs
        ]
        try:
            with self.open().begin(buffers=False) as txn:
                for key, src, dst, size in positions:
                    data = txn.get(key)
                    if data is None:
                        raise StudyError(study, f"missing tile {key.decode()}", self.path)
                    what = f"tile {key.decode()}"
                    payload = self._payload(key, data, what, study)
                    record = self._decode_or_fail(payload, what, study)
                    self._fill(study, key, record, (src, dst, size), targets)
        except lmdb.Error as exc:
            raise StudyError(study, f"cannot read tiles ({exc})", self.path) from exc
        return dict(outs)

    def _fill(
        self,
        study: str,
        key: bytes,
        record: Any,
        geometry: tuple[tuple[slice, ...], tuple[slice, ...], tuple[int, ...]],
        targets: list[tuple[str, np.ndarray, np.dtype]],
    ) -> None:
        """Copy one tile position into the outputs; `geometry` is (source slices in the tile,
        destination slices in the output, the tile's shape)."""
        src, dst, size = geometry
        tiles = record if type(record) is dict else {}
        for name, out, dtype in targets:
            tile = tiles.get(name)
            if type(tile) is np.ndarray and tile.shape == size and tile.dtype == dtype:
                out[dst] = tile[src]
            elif isinstance(tile, int | float):
                out[dst] = tile
            else:
                what = f"{tile.shape} {tile.dtype}" if type(tile) is np.ndarray else repr(tile)
                self._fail(study, f"tile {key.decode()}: {name} is {what}, not {size} {dtype}")


def _unsealed_version(data: bytes) -> Any:
    """The format version of a `__meta__` value written without a checksum (versions 1-3), or
    None: such a database asks for a re-pack instead of reporting corruption."""
    try:
        meta = decode(data)
    except Exception:
        return None
    return meta.get("format_version") if isinstance(meta, dict) else None


def _axis_tiles(start: int, stop: int, tile: int, n: int) -> list[tuple[int, slice, slice, int]]:
    """Along one axis, for every tile that [start, stop) touches: its index, the slice of it that
    is read, where that goes in the output, and the tile's length (shorter at the volume end)."""
    tiles = []
    for index in range(start // tile, (stop - 1) // tile + 1):
        origin = index * tile
        src = slice(max(start - origin, 0), min(stop - origin, tile))
        tiles.append(
            (
                index,
                src,
                slice(origin + src.start - start, origin + src.stop - start),
                min(tile, n - origin),
            )
        )
    return tiles
