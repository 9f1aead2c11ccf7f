"""The codec of stored values: compressed pickles (compress-pickle) read back through a
restricted unpickler.

Values are unpickled by a restricted unpickler that accepts numpy arrays, dtypes and scalars and
plain Python types only, so a tampered database cannot run code. Compressed values are the files
compress-pickle writes (gzip, bz2 or xz around a pickle); `decode` tells them apart from plain
pickles by their magic bytes, so both can sit side by side.
"""

from __future__ import annotations

import bz2
import io
import lzma
import pickle
import zlib
from typing import IO, Any

import compress_pickle
from compress_pickle.picklers.base import BasePicklerIO
from compress_pickle.picklers.registry import get_known_picklers, register_pickler

PICKLER = "stepseg_restricted"


def _gunzip(data: bytes | memoryview) -> bytes:
    """One-shot gunzip into a buffer of the exact size (the gzip trailer's ISIZE field)."""
    size = int.from_bytes(data[-4:], "little")
    return zlib.decompress(data, wbits=31, bufsize=max(size, 1))


# compress-pickle codecs and the keyword that sets their compression level
LEVEL_KEYWORD = {"gzip": "compresslevel", "bz2": "compresslevel", "lzma": "preset"}
DECOMPRESS = {"gzip": _gunzip, "bz2": bz2.decompress, "lzma": lzma.decompress, None: bytes}
MAGIC = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "lzma": b"\xfd7zXZ"}
CODECS = ["gzip", "bz2", "lzma", None]


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
