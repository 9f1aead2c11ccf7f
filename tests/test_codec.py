"""The codec of stored values: every codec round-trips numpy arrays and plain values, the codec
is told by its magic bytes, and the restricted unpickler refuses anything else."""

import bz2
import datetime
import gzip
import lzma
import os
import pickle

import numpy as np
import pytest

from stepseg import codec

RECORD = {
    "suv": np.arange(24, dtype=np.float16).reshape(2, 3, 4) / 8,
    "ct": np.full((2, 3, 4), -1000, np.int16),
    "steps": np.array([[[0, 1, 255]]], np.uint8),
    "affine": np.eye(4),
    "spacing_zyx": (3.0, 2.04, 2.04),
    "suv_max": np.float32(12.5),
    "studies": ["PETCT_a", "PETCT_b"],
    "targets": {"preset": "paper", "steps": None},
    "has_lesions": True,
    "lesion_voxel_count": 3,
}
# what each codec's value starts with (a plain value: pickle protocol 5)
HEADS = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "lzma": b"\xfd7zXZ\x00", None: b"\x80\x05"}


def assert_same_record(decoded: dict) -> None:
    assert list(decoded) == list(RECORD)
    for name, value in RECORD.items():
        if isinstance(value, np.ndarray | np.generic):
            assert type(decoded[name]) is type(value) and decoded[name].dtype == value.dtype
            np.testing.assert_array_equal(decoded[name], value)
        else:
            assert decoded[name] == value, name


@pytest.mark.parametrize("name", codec.CODECS)
def test_every_codec_round_trips_arrays_and_plain_values(name):
    for level in (None, 1, 9):
        data = codec.encode(RECORD, name, level)
        assert data.startswith(HEADS[name])
        assert_same_record(codec.decode(data))
        assert_same_record(codec.decode(memoryview(data)))  # as LMDB hands values out


def test_plain_and_compressed_values_sit_side_by_side():
    """`decode` needs no codec: what compress-pickle wrote with gzip, bz2 or xz is a stream of
    the module's own compressor around a plain pickle."""
    plain = pickle.dumps(RECORD, protocol=5)
    for data in (plain, gzip.compress(plain), bz2.compress(plain), lzma.compress(plain)):
        assert_same_record(codec.decode(data))
    quiet = np.zeros((16, 64, 64), np.float16)
    assert len(codec.encode(quiet, "gzip", 1)) < len(codec.encode(quiet, None)) / 20


def test_the_level_reaches_the_compressor():
    """gzip level 0 stores, level 9 packs 4 bits of entropy a byte to about half; xz's preset
    goes through as its `preset`."""
    rng = np.random.default_rng(0)
    nibbles = rng.integers(0, 16, 200_000, dtype=np.uint8)
    assert len(codec.encode(nibbles, "gzip", 0)) > nibbles.size
    assert len(codec.encode(nibbles, "gzip", 9)) < 0.6 * nibbles.size
    assert len(codec.encode(nibbles, "lzma", 0)) > 1.05 * len(codec.encode(nibbles, "lzma", 9))


def test_unsupported_codec_names_the_choices():
    with pytest.raises(
        ValueError, match=r"unsupported codec 'lz5'; choose one of \['gzip', 'bz2', 'lzma', None\]"
    ):
        codec.encode(np.zeros(3), "lz5")


class Exploit:
    """A pickle that runs a shell command when loaded by a plain unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("exploit", f"{os.system.__module__}.system"),
        (datetime.date(2022, 9, 18), "datetime.date"),
        (np.array([datetime.date(2022, 9, 18)], dtype=object), "datetime.date"),
    ],
    ids=["os.system", "a date", "an object array"],
)
@pytest.mark.parametrize("compress", [None, gzip.compress, bz2.compress, lzma.compress])
def test_the_restricted_unpickler_refuses_other_globals(tmp_path, value, refused, compress):
    """Whatever the codec: a pickle naming any global but numpy's array and scalar constructors
    is refused before that global is called, with the global's name in the message."""
    marker = tmp_path / "pwned"
    data = pickle.dumps(Exploit(marker) if value == "exploit" else value, protocol=5)
    with pytest.raises(pickle.UnpicklingError) as error:
        codec.decode(compress(data) if compress else data)
    assert str(error.value) == f"refusing to unpickle global {refused}"
    assert not marker.exists()
