"""The tile store as packed and read: round trip, metadata, atomicity, the restricted unpickler
and bad databases."""

import gzip
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest

from stepseg import codec, nifti, pack, presets, stepmap, tilestore
from stepseg.errors import StudyError
from stepseg.settings import PackSettings, TargetsSettings

AFFINE = np.array([[-2.04, 0, 0, 400.0], [0, -2.04, 0, 300.0], [0, 0, 3.0, -900.0], [0, 0, 0, 1]])
PACK = {"codec": "gzip", "level": 1, "tile_shape": [8, 16, 16], "max_compressed_ratio": 0.35}
TARGETS = TargetsSettings(preset="released_code")


def make_study(folder, shape, seed, lesion=True, suv_max=None):
    """SUV/CTres/steps NIfTI files: air outside an ellipse, noise inside (all tile kinds)."""
    rng = np.random.default_rng(seed)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] / 3)) ** 2 + ((x - shape[2] / 2) / (shape[2] / 3)) ** 2
    body = np.broadcast_to(body < 1, shape)
    suv = np.where(body, rng.gamma(2, 0.6, shape), 0).astype(np.float32)
    ct = np.where(body, rng.integers(-900, 1500, shape), -1000).astype(np.int16)
    seg = np.zeros(shape, bool)
    if lesion:
        seg[shape[0] // 2, shape[1] // 2 : shape[1] // 2 + 3, shape[2] // 2] = True
        suv[seg] = 12.0
    if suv_max is not None:
        suv[0, 0, 0] = suv_max
    folder.mkdir(parents=True, exist_ok=True)
    nifti.save(nifti.Volume(suv, AFFINE), folder / "SUV.nii.gz")
    nifti.save(nifti.Volume(ct, AFFINE), folder / "CTres.nii.gz")
    steps = stepmap.step_map(seg, presets.RELEASED_CODE.voxel_steps((3.0, 2.04, 2.04)))
    nifti.save(nifti.Volume(steps, AFFINE), folder / "steps.nii.gz")
    return suv, ct, steps


def pack_studies(tmp_path, folders, out="train.lmdb", settings=PACK):
    names = [f.name for f in folders]
    pack.pack_split(
        studies=names,
        suv_paths=[f / "SUV.nii.gz" for f in folders],
        ctres_paths=[f / "CTres.nii.gz" for f in folders],
        steps_paths=[f / "steps.nii.gz" for f in folders],
        out_dir=tmp_path / out,
        settings=PackSettings.from_mapping(settings),
        target_settings=TARGETS,
    )
    return tmp_path / out


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lmdb")
    shapes = {"PETCT_a": (21, 37, 45), "PETCT_b": (9, 20, 18)}
    data = {
        name: make_study(tmp_path / name, shape, seed, lesion=(name == "PETCT_a"))
        for seed, (name, shape) in enumerate(shapes.items())
    }
    return pack_studies(tmp_path, [tmp_path / name for name in shapes]), data


def test_data_identity_follows_the_content_not_its_storage(packed, tmp_path):
    """Each study's digest covers what training reads (voxels as stored, study metadata), not
    the codec or tile shape; one changed voxel changes its study's digest only."""
    path, data = packed
    identity = tilestore.TileStore(path).data_identity
    assert [study for study, _ in identity["studies"]] == ["PETCT_a", "PETCT_b"]
    assert all(len(digest) == 64 for _, digest in identity["studies"])
    assert identity["targets"] == TARGETS.to_dict()
    folders = [path.parent / study for study in data]
    other_storage = {**PACK, "codec": "bz2", "tile_shape": [4, 8, 8]}
    repacked = pack_studies(tmp_path, folders, out="bz2.lmdb", settings=other_storage)
    assert tilestore.TileStore(repacked).data_identity == identity
    suv, ct, steps = data["PETCT_b"]
    changed = tmp_path / "PETCT_b"
    changed.mkdir()
    ct = ct.copy()
    ct[4, 10, 9] += 1
    nifti.save(nifti.Volume(suv, AFFINE), changed / "SUV.nii.gz")
    nifti.save(nifti.Volume(ct, AFFINE), changed / "CTres.nii.gz")
    nifti.save(nifti.Volume(steps, AFFINE), changed / "steps.nii.gz")
    one_voxel = pack_studies(tmp_path, [folders[0], changed], out="voxel.lmdb")
    a, b = tilestore.TileStore(one_voxel).data_identity["studies"]
    assert a == identity["studies"][0] and b[0] == "PETCT_b" and b != identity["studies"][1]


def full_box(shape):
    return tuple(slice(0, n) for n in shape)


def test_round_trip_equals_the_nifti_data(packed):
    path, data = packed
    reader = tilestore.TileStore(path)
    for study, (suv, ct, steps) in data.items():
        volumes = reader.read_patch(study, full_box(suv.shape))
        assert {name: v.dtype for name, v in volumes.items()} == tilestore.DTYPES
        np.testing.assert_array_equal(volumes["suv"], suv.astype(np.float16))
        rel = np.abs(volumes["suv"] - suv) / np.maximum(suv, 1e-3)
        assert rel.max() <= 2**-11  # float16 precision
        np.testing.assert_array_equal(volumes["ct"], ct)
        np.testing.assert_array_equal(volumes["steps"], steps)
    rng = np.random.default_rng(0)
    suv, ct, steps = data["PETCT_a"]
    for _ in range(20):
        start = [int(rng.integers(0, n)) for n in ct.shape]
        box = tuple(
            slice(s, int(rng.integers(s + 1, n + 1))) for s, n in zip(start, ct.shape, strict=True)
        )
        volumes = reader.read_patch("PETCT_a", box)
        np.testing.assert_array_equal(volumes["suv"], suv.astype(np.float16)[box])
        np.testing.assert_array_equal(volumes["ct"], ct[box])
        np.testing.assert_array_equal(volumes["steps"], steps[box])
    # any views as outputs, any subset of the volumes: flipped along z and x, CT only
    flipped = np.empty((5, 6, 7), np.int16)
    box = (slice(2, 7), slice(3, 9), slice(4, 11))
    back = reader.read_patch("PETCT_a", box, {"ct": flipped[::-1, :, ::-1]})
    assert list(back) == ["ct"] and back["ct"].base is flipped
    np.testing.assert_array_equal(flipped[::-1, :, ::-1], ct[box])
    with pytest.raises(ValueError, match=r"ct out has \(5, 6, 7\) float32"):
        reader.read_patch("PETCT_a", box, {"ct": np.empty((5, 6, 7), np.float32)})
    with pytest.raises(KeyError, match="unknown volume 'pet'"):
        reader.read_patch("PETCT_a", box, {"pet": flipped})


def test_metadata(packed):
    path, data = packed
    reader = tilestore.TileStore(path)
    meta = reader.meta
    assert meta["format_version"] == tilestore.FORMAT_VERSION == 6
    assert meta["studies"] == ["PETCT_a", "PETCT_b"]
    assert meta["tile_shape"] == (8, 16, 16) and meta["codec"] == "gzip"
    assert meta["targets"] == TARGETS.to_dict() and "normalisation" not in meta
    a = reader.study_meta("PETCT_a")
    assert a["shape"] == (21, 37, 45) and a["has_lesions"] and a["lesion_voxel_count"] == 3
    np.testing.assert_allclose(a["affine"], AFFINE)
    np.testing.assert_allclose(a["spacing_zyx"], (3.0, 2.04, 2.04))
    steps = data["PETCT_a"][2]
    assert all(steps[tuple(v)] == 0 for v in a["lesion_voxels"])
    b = reader.study_meta("PETCT_b")
    assert not b["has_lesions"] and len(b["lesion_voxels"]) == 0


def test_one_record_per_tile_position_constant_plain_or_compressed_and_small(packed):
    path, data = packed
    env = tilestore.TileStore(path).open()  # the process's shared read-only handle
    kinds = {"constant": 0, "plain": 0, "gzip": 0}
    positions = set()
    record_bytes = 0
    with env.begin() as txn:
        for key, value in txn.cursor():
            record_bytes += len(key) + len(value)
            if key == tilestore.META_KEY or key.endswith(b"/meta"):
                continue
            study, *index = key.decode().split("/")
            positions.add((study, *map(int, index)))
            payload = tilestore.unseal(key, value)
            record = codec.decode(payload)
            assert list(record) == list(tilestore.DTYPES)
            for tile in record.values():
                if isinstance(tile, np.ndarray):
                    kinds["gzip" if payload[:2] == b"\x1f\x8b" else "plain"] += 1
                else:
                    kinds["constant"] += 1
    assert all(kinds.values()), kinds
    grids = {
        study: tilestore.tile_grid(arrays[0].shape, (8, 16, 16)) for study, arrays in data.items()
    }
    assert positions == {
        (study, z, y, x)
        for study, (nz, ny, nx) in grids.items()
        for z in range(nz)
        for y in range(ny)
        for x in range(nx)
    }
    # What the format achieves here (incompressible noise in the 35 % of voxels inside the body;
    # measured 2.78 and 4.72 bytes a voxel): records of 3 bytes a voxel at most, against 5 for
    # float16 SUV + int16 CT + uint8 steps stored plainly, and a database of 5 bytes a voxel at
    # most (LMDB pages and metadata weigh on volumes this small), against 7 for float32 + int16 +
    # uint8, the NIfTI dtypes.
    voxels = sum(suv.size for suv, _, _ in data.values())
    assert record_bytes < 3.0 * voxels
    stored = sum(f.stat().st_size for f in path.iterdir())
    assert stored < 5.0 * voxels


def _writable_copy(source: Path, path: Path) -> tuple[Path, lmdb.Environment]:
    """A copy of the packed LMDB `source` at `path`, opened for writing (to tamper with)."""
    path.mkdir()
    (path / "data.mdb").write_bytes((source / "data.mdb").read_bytes())
    return path, lmdb.open(str(path), subdir=True)


def test_malicious_pickle_is_refused(packed, tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    payload = gzip.compress(pickle.dumps(Exploit(), protocol=5))
    path, env = _writable_copy(packed[0], tmp_path / "tampered.lmdb")
    with env.begin(write=True) as txn:  # with a valid checksum: the unpickler must refuse it
        txn.put(b"PETCT_a/0/0/0", tilestore.seal(b"PETCT_a/0/0/0", payload))
    env.close()
    with pytest.raises(StudyError, match=r"study PETCT_a.*refusing to unpickle global"):
        tilestore.TileStore(path).read_patch("PETCT_a", (slice(0, 2),) * 3)
    assert not (tmp_path / "pwned").exists()


def test_missing_tile_and_unknown_study_name_the_study(packed, tmp_path):
    path, env = _writable_copy(packed[0], tmp_path / "holey.lmdb")
    with env.begin(write=True) as txn:
        txn.delete(b"PETCT_b/0/1/0")
        # a record of the wrong shape (e.g. another study's) and one without the step tile,
        # both with valid checksums
        record = codec.decode(tilestore.unseal(b"PETCT_a/0/0/0", txn.get(b"PETCT_a/0/0/0")))
        txn.put(b"PETCT_b/0/0/1", tilestore.seal(b"PETCT_b/0/0/1", codec.encode(record, None)))
        bare = codec.encode({"suv": 0.0, "ct": -1000}, None)
        txn.put(b"PETCT_b/0/0/0", tilestore.seal(b"PETCT_b/0/0/0", bare))
    env.close()
    reader = tilestore.TileStore(path)
    with pytest.raises(StudyError, match=r"study PETCT_b.*missing tile PETCT_b/0/1/0"):
        reader.read_patch("PETCT_b", (slice(0, 9), slice(16, 20), slice(0, 18)))
    with pytest.raises(
        StudyError, match=r"study PETCT_b.*tile PETCT_b/0/0/1: suv is \(8, 16, 16\)"
    ):
        reader.read_patch("PETCT_b", (slice(0, 9), slice(0, 1), slice(16, 18)))
    with pytest.raises(StudyError, match=r"study PETCT_b.*tile PETCT_b/0/0/0: steps is None"):
        reader.read_patch("PETCT_b", (slice(0, 1),) * 3)
    np.testing.assert_array_equal(
        reader.read_patch("PETCT_b", (slice(0, 1),) * 3, {"ct": np.empty((1, 1, 1), np.int16)})[
            "ct"
        ],
        -1000,
    )
    with pytest.raises(StudyError, match=r"study PETCT_zz.*not in this LMDB"):
        reader.read_patch("PETCT_zz", (slice(0, 1),) * 3)
    with pytest.raises(StudyError, match="outside volume"):
        reader.read_patch("PETCT_b", (slice(0, 10), slice(0, 1), slice(0, 1)))


@pytest.mark.parametrize("sealed", [False, True])
def test_other_format_version_asks_for_a_repack(packed, tmp_path, sealed):
    """Versions up to 3 stored values without a checksum, version 4 no content digests (and 5 no
    lesion components: the same refusal)."""
    path, env = _writable_copy(packed[0], tmp_path / "old.lmdb")
    with env.begin(write=True) as txn:
        meta = codec.decode(tilestore.unseal(tilestore.META_KEY, txn.get(tilestore.META_KEY)))
        value = codec.encode({**meta, "format_version": 4 if sealed else 3}, None)
        txn.put(tilestore.META_KEY, tilestore.seal(tilestore.META_KEY, value) if sealed else value)
    env.close()
    with pytest.raises(
        tilestore.StoreError,
        match=rf"old.lmdb: format version {4 if sealed else 3}, expected 6: written by another "
        r"stepseg version; delete it and re-pack \(the pack rule rebuilds it\)",
    ):
        _ = tilestore.TileStore(path).meta


def test_empty_missing_and_corrupt_databases(tmp_path):
    with pytest.raises(tilestore.StoreError, match=r"no data.mdb"):
        _ = tilestore.TileStore(tmp_path / "nothing.lmdb").meta
    empty = tmp_path / "empty.lmdb"
    lmdb.open(str(empty), subdir=True).close()
    with pytest.raises(tilestore.StoreError, match="empty or incompletely written"):
        _ = tilestore.TileStore(empty).meta
    corrupt = tmp_path / "corrupt.lmdb"
    corrupt.mkdir()
    (corrupt / "data.mdb").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(tilestore.StoreError, match=r"corrupt.lmdb"):
        _ = tilestore.TileStore(corrupt).meta


def test_encode_record_choices():
    air = {
        "suv": np.zeros((4, 16, 16), np.float16),
        "ct": np.full((4, 16, 16), -1000, np.int16),
        "steps": np.full((4, 16, 16), 7, np.uint8),
    }
    constant = tilestore.encode_record(air, "gzip", 1, 0.35)
    assert constant[:1] == b"\x80"  # nothing to compress
    assert codec.decode(constant) == {"suv": 0.0, "ct": -1000, "steps": 7}
    rng = np.random.default_rng(0)
    noise = rng.integers(-1000, 1000, (4, 16, 16)).astype(np.int16)
    body = {"suv": noise.astype(np.float16), "ct": noise, "steps": np.zeros_like(noise, np.uint8)}
    body["steps"][0, 0, 0] = 1
    plain = tilestore.encode_record(body, "gzip", 1, 0.35)
    assert plain[:1] == b"\x80"  # noise compresses poorly: all three plain, steps included
    decoded = codec.decode(plain)
    for name, tile in body.items():
        np.testing.assert_array_equal(decoded[name], tile)
        assert decoded[name].dtype == tile.dtype
    assert tilestore.encode_record(body, "gzip", 1, 1.0)[:2] == b"\x1f\x8b"
    edge = {**air, "suv": air["suv"].copy()}
    edge["suv"][1, 2, 3] = 2.5
    packed = tilestore.encode_record(edge, "gzip", 1, 0.35)
    assert packed[:2] == b"\x1f\x8b"
    assert codec.decode(packed)["ct"] == -1000
    np.testing.assert_array_equal(codec.decode(packed)["suv"], edge["suv"])


def _rewrite(path: Path, key: bytes, change) -> None:
    """Replace the stored value of `key` by `change(value)`, through LMDB (no page damage)."""
    env = lmdb.open(str(path), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(key, change(txn.get(key)))
    env.close()


def _flip(value: bytes, offset: int) -> bytes:
    return value[:offset] + bytes([value[offset] ^ 0x10]) + value[offset + 1 :]


def test_flipped_byte_in_a_value_names_study_and_tile(packed, tmp_path):
    """Plain tiles have no other check: one flipped byte used to read as a CT voxel 4096 HU off."""
    path, env = _writable_copy(packed[0], tmp_path / "flipped.lmdb")
    env.close()
    key = b"PETCT_a/1/1/1"  # inside the body: a plain (uncompressed) record
    _rewrite(path, key, lambda value: _flip(value, len(value) // 2))
    reader = tilestore.TileStore(path)
    with pytest.raises(
        StudyError,
        match=rf"study PETCT_a, file {tmp_path / 'flipped.lmdb'}: tile PETCT_a/1/1/1: checksum "
        r"mismatch \(stored CRC32 [0-9a-f]{8}, computed [0-9a-f]{8}\): the LMDB is corrupt; "
        r"delete it and re-pack",
    ):
        reader.read_patch("PETCT_a", (slice(8, 9), slice(16, 17), slice(16, 17)))
    # tiles that do not touch it still read, and unchecked the flip goes unnoticed
    reader.read_patch("PETCT_a", (slice(0, 8), slice(0, 16), slice(0, 16)))
    unchecked = tilestore.TileStore(path, verify_checksums=False)
    unchecked.read_patch("PETCT_a", (slice(8, 16), slice(16, 32), slice(16, 32)))


def test_a_valid_value_under_another_key_is_refused(packed, tmp_path):
    path, env = _writable_copy(packed[0], tmp_path / "moved.lmdb")
    with env.begin(write=True) as txn:
        txn.put(b"PETCT_a/0/0/1", txn.get(b"PETCT_a/0/0/0"))
    env.close()
    with pytest.raises(StudyError, match=r"tile PETCT_a/0/0/1: checksum mismatch"):
        tilestore.TileStore(path).read_patch("PETCT_a", (slice(0, 1), slice(0, 1), slice(16, 17)))


def test_corrupt_metadata_records_are_refused(packed, tmp_path):
    path, env = _writable_copy(packed[0], tmp_path / "meta.lmdb")
    env.close()
    _rewrite(path, b"PETCT_b/meta", lambda value: _flip(value, 40))
    reader = tilestore.TileStore(path)
    with pytest.raises(StudyError, match=r"study PETCT_b, .*: metadata record: checksum mismatch"):
        reader.study_meta("PETCT_b")
    reader.close()
    _rewrite(path, tilestore.META_KEY, lambda value: _flip(value, 60))
    with pytest.raises(
        tilestore.StoreError, match=r"meta.lmdb: __meta__ record: checksum mismatch"
    ):
        _ = tilestore.TileStore(path).meta


OUTCOMES = {0: "original", 1: "silently different", 2: "clear error", 3: "other exception"}


def _read_everything_in_a_child(path: Path, data: dict, verify: bool) -> str:
    """Read every volume of the LMDB at `path` in a forked process: LMDB follows damaged page
    pointers of its own without bounds checks and may die of SIGBUS, which must not take the
    test runner with it. Returns an `OUTCOMES` value or "killed by signal N"."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 3
        try:
            reader = tilestore.TileStore(path, verify_checksums=verify)
            same = True
            for study, (suv, ct, steps) in data.items():
                volumes = reader.read_patch(study, full_box(suv.shape))
                same &= np.array_equal(volumes["suv"], suv.astype(np.float16))
                same &= np.array_equal(volumes["ct"], ct)
                same &= np.array_equal(volumes["steps"], steps)
            code = 0 if same else 1
        except (StudyError, tilestore.StoreError):
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return OUTCOMES[os.WEXITSTATUS(status)]


@pytest.mark.parametrize("verify", [True, False])
def test_random_byte_flips_never_give_silently_wrong_volumes(packed, tmp_path, verify):
    """60 copies of the LMDB with 8 random bytes flipped anywhere in the file (values, LMDB pages,
    metadata): every read returns the original volumes or fails with a clear error. Without the
    checksums the same damage is read as data, so the test can fail."""
    source, data = packed
    original = (source / "data.mdb").read_bytes()
    rng = np.random.default_rng(18)
    outcomes: dict[str, int] = {}
    for trial in range(60):
        damaged = bytearray(original)
        for offset in rng.integers(0, len(damaged), 8):
            damaged[offset] ^= int(rng.integers(1, 256))
        path = tmp_path / f"trial{trial}.lmdb"
        path.mkdir()
        (path / "data.mdb").write_bytes(damaged)
        outcome = _read_everything_in_a_child(path, data, verify)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if verify:
        assert set(outcomes) <= {"original", "clear error"}, outcomes
        assert outcomes["clear error"] >= 55, outcomes  # 8 flips nearly always hit a value
    else:  # with this seed: 15 of the 60 copies
        assert outcomes.get("silently different", 0) >= 12, outcomes
