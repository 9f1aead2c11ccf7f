"""The LMDB layout of a packed split and its reader, `TileStore`.

Layout (format version 5): the volumes of a study (SUV as float16, CT as int16 HU, step map as
uint8) are cut into tiles of `tile_shape` (z, y, x); the three tiles at one position form one
LMDB value under the key `{study}/{tz}/{ty}/{tx}`: a compressed pickle (`stepseg.codec`, codec
configurable) of `{"suv": ..., "ct": ..., "steps": ...}` (`encode_record`), each a 3-D array or,
for a constant tile (air), its value. Reading a 32x160x160 patch therefore decompresses only the
tiles it touches, never whole slices, and costs one look-up and one unpickle per position for all
three volumes: per-volume values (version 2) took three, and the loader a third more CPU time per
patch (bench/loader.py: 14-16 ms against 11-12 ms, of which 7-8 ms is the DataLoader's own
transfer). `{study}/meta` holds the study's shape, spacing, affine, a lesion voxel index and a hot
voxel index (SUV >= `hot_suv_min` outside lesions: the physiological uptake that crops learn to
reject), `__meta__` the format version, codec, tile shape, dtypes, normalisation and target
settings, the studies and each study's content digest (`data_identity`); both metadata records
are uncompressed pickles, so they are readable before the codec is known. `stepseg.pack` writes
it.

Every value is stored behind the CRC32 of its key and its bytes (`seal`), verified on every read
(`unseal`): LMDB checks its own pages but not the values, and a flipped byte inside a plain tile
would otherwise be read as a voxel off by thousands of HU, a NaN or a negative SUV. Covering the
key also refuses a value that landed under another key. The check costs about 0.8 ms per MB
(bench/loader.py prints the read time with and without it).
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import lmdb
import numpy as np

from stepseg import LMDB_FORMAT_VERSION
from stepseg.codec import decode, encode
from stepseg.errors import StudyError

FORMAT_VERSION = LMDB_FORMAT_VERSION
META_KEY = b"__meta__"
DTYPES = {"suv": np.float16, "ct": np.int16, "steps": np.uint8}
CHECKSUM = struct.Struct("<I")  # CRC32 of key and payload, in front of the payload
REPACK = "delete it and re-pack (the pack rule rebuilds it)"

Box = tuple[slice, slice, slice]


class StoreError(RuntimeError):
    """The database as a whole is unusable (missing, empty, corrupt, wrong version)."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"LMDB {self.path}: {message}")


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

    @property
    def data_identity(self) -> dict[str, Any]:
        """What a model trained on this store depends on: its studies in order, each with the
        content digest written at pack time, and the target settings (`stepseg.train` records it
        in a training state and resumes that state only on the same data)."""
        meta = self.meta
        return {
            "studies": [[study, meta["digests"][study]] for study in meta["studies"]],
            "targets": meta["targets"],
        }

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
