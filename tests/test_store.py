"""LMDB packing: round trip, metadata, atomicity, the restricted unpickler and bad databases."""

import gzip
import logging
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest

from stepseg import nifti, store, targets
from stepseg.errors import StudyError

AFFINE = np.array([[-2.04, 0, 0, 400.0], [0, -2.04, 0, 300.0], [0, 0, 3.0, -900.0], [0, 0, 0, 1]])
PACK = {"codec": "gzip", "level": 1, "tile_shape": [8, 16, 16], "max_compressed_ratio": 0.35}
TARGETS = {"preset": "released_code"}


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
    steps = targets.step_map(seg, targets.RELEASED_CODE)
    nifti.save(nifti.Volume(steps, AFFINE), folder / "steps.nii.gz")
    return suv, ct, steps


def pack(tmp_path, folders, out="train.lmdb", settings=PACK):
    names = [f.name for f in folders]
    store.pack_split(
        names,
        [f / "SUV.nii.gz" for f in folders],
        [f / "CTres.nii.gz" for f in folders],
        [f / "steps.nii.gz" for f in folders],
        tmp_path / out,
        settings,
        TARGETS,
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
    return pack(tmp_path, [tmp_path / name for name in shapes]), data


def full_box(shape):
    return tuple(slice(0, n) for n in shape)


def test_round_trip_equals_the_nifti_data(packed):
    path, data = packed
    reader = store.TileStore(path)
    for study, (suv, ct, steps) in data.items():
        volumes = reader.read_patch(study, full_box(suv.shape))
        assert {name: v.dtype for name, v in volumes.items()} == store.DTYPES
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
    reader = store.TileStore(path)
    meta = reader.meta
    assert meta["format_version"] == store.FORMAT_VERSION == 3
    assert meta["studies"] == ["PETCT_a", "PETCT_b"]
    assert meta["tile_shape"] == (8, 16, 16) and meta["codec"] == "gzip"
    assert meta["targets"] == TARGETS and "log2" in meta["normalisation"]["pet"]
    a = reader.study_meta("PETCT_a")
    assert a["shape"] == (21, 37, 45) and a["has_lesions"] and a["lesion_voxel_count"] == 3
    np.testing.assert_allclose(a["affine"], AFFINE)
    np.testing.assert_allclose(a["spacing_zyx"], (3.0, 2.04, 2.04))
    steps = data["PETCT_a"][2]
    assert all(steps[tuple(v)] == 0 for v in a["lesion_voxels"])
    b = reader.study_meta("PETCT_b")
    assert not b["has_lesions"] and len(b["lesion_voxels"]) == 0


def test_hot_voxel_index_holds_high_uptake_outside_lesions(packed, tmp_path):
    path, data = packed
    reader = store.TileStore(path)
    assert reader.meta["hot_suv_min"] == 3.0  # the default
    for study, (suv, _, steps) in data.items():
        meta = reader.study_meta(study)
        hot = (suv >= 3.0) & (steps != 0)
        assert meta["hot_voxel_count"] == int(hot.sum()) > 0
        index = meta["hot_voxels"]
        assert index.dtype == np.uint16 and len(index) == len(np.unique(index, axis=0))
        assert all(hot[tuple(v)] for v in index)
        assert len(index) == min(int(hot.sum()), 4096)
    # the lesion (SUV 12) is hot but never a hard negative; a cap keeps a random subset
    folder = tmp_path / "PETCT_a"
    suv, _, steps = make_study(folder, (21, 37, 45), 0)
    capped = store.TileStore(pack(tmp_path, [folder], settings={**PACK, "hot_index_max": 10}))
    meta = capped.study_meta("PETCT_a")
    assert len(meta["hot_voxels"]) == 10 and meta["hot_voxel_count"] > 10
    assert all(steps[tuple(v)] != 0 and suv[tuple(v)] >= 3.0 for v in meta["hot_voxels"])
    raised = store.TileStore(pack(tmp_path, [folder], "high.lmdb", {**PACK, "hot_suv_min": 5.0}))
    assert raised.study_meta("PETCT_a")["hot_voxel_count"] == int(((suv >= 5) & (steps != 0)).sum())


def test_one_record_per_tile_position_constant_plain_or_compressed_and_small(packed):
    path, data = packed
    env = store.TileStore(path).open()  # the process's shared read-only handle
    kinds = {"constant": 0, "plain": 0, "gzip": 0}
    positions = set()
    with env.begin() as txn:
        for key, value in txn.cursor():
            if key == store.META_KEY or key.endswith(b"/meta"):
                continue
            study, *index = key.decode().split("/")
            positions.add((study, *map(int, index)))
            record = store.decode(value)
            assert list(record) == list(store.DTYPES)
            for tile in record.values():
                if isinstance(tile, np.ndarray):
                    kinds["gzip" if value[:2] == b"\x1f\x8b" else "plain"] += 1
                else:
                    kinds["constant"] += 1
    assert all(kinds.values()), kinds
    grids = {study: store.tile_grid(arrays[0].shape, (8, 16, 16)) for study, arrays in data.items()}
    assert positions == {
        (study, z, y, x)
        for study, (nz, ny, nx) in grids.items()
        for z in range(nz)
        for y in range(ny)
        for x in range(nx)
    }
    stored = sum(f.stat().st_size for f in path.iterdir())
    voxels = sum(suv.size for suv, _, _ in data.values())
    assert stored < voxels * 10 * 4 / 4  # far below raw float32 (tiny volumes: LMDB pages)


def test_float16_overflow_is_clipped_with_a_log(tmp_path, caplog):
    make_study(tmp_path / "PETCT_hot", (8, 16, 16), 3, suv_max=70000.0)
    with caplog.at_level(logging.WARNING):
        path = pack(tmp_path, [tmp_path / "PETCT_hot"])
    assert "PETCT_hot" in caplog.text and "clipped" in caplog.text
    value = store.TileStore(path).read_patch("PETCT_hot", (slice(0, 1),) * 3)["suv"]
    assert float(value[0, 0, 0]) == 65504.0


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("shape", r"CTres.nii.gz: CTres shape \(8, 16, 17\) \(z, y, x\) differs"),
        ("nan", "SUV.nii.gz: SUV has 1 NaN and 0 infinite voxels"),
        ("negative", r"SUV.nii.gz: SUV has 1 negative voxels \(min -0.25\)"),
        ("ct", r"CTres.nii.gz: CTres has 1 voxels outside the plausible range \[-1100, 4000\]"),
    ],
)
def test_bad_study_fails_atomically_naming_it(tmp_path, problem, message):
    make_study(tmp_path / "PETCT_ok", (8, 16, 16), 1)
    suv, ct, _ = make_study(tmp_path / "PETCT_bad", (8, 16, 16), 2)
    if problem == "shape":
        ct = np.zeros((8, 16, 17), np.int16)
    elif problem == "ct":
        ct[2, 3, 4] = -2048  # padding of some scanners outside the field of view
    else:
        suv[1, 1, 1] = np.nan if problem == "nan" else -0.25
    nifti.save(nifti.Volume(suv, AFFINE), tmp_path / "PETCT_bad" / "SUV.nii.gz")
    nifti.save(nifti.Volume(ct, AFFINE), tmp_path / "PETCT_bad" / "CTres.nii.gz")
    with pytest.raises(StudyError, match=message) as error:
        pack(tmp_path, [tmp_path / "PETCT_ok", tmp_path / "PETCT_bad"])
    assert f"study PETCT_bad, file {tmp_path / 'PETCT_bad'}" in str(error.value)
    assert not any(p.name.startswith(("train.lmdb", ".train.lmdb")) for p in tmp_path.iterdir())


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
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global"):
        store.decode(payload)
    path, env = _writable_copy(packed[0], tmp_path / "tampered.lmdb")
    with env.begin(write=True) as txn:
        txn.put(b"PETCT_a/0/0/0", payload)
    env.close()
    with pytest.raises(StudyError, match=r"study PETCT_a.*refusing to unpickle global"):
        store.TileStore(path).read_patch("PETCT_a", (slice(0, 2),) * 3)
    assert not (tmp_path / "pwned").exists()


def test_missing_tile_and_unknown_study_name_the_study(packed, tmp_path):
    path, env = _writable_copy(packed[0], tmp_path / "holey.lmdb")
    with env.begin(write=True) as txn:
        txn.delete(b"PETCT_b/0/1/0")
        # a record of the wrong shape (e.g. another study's) and one without the step tile
        record = store.decode(txn.get(b"PETCT_a/0/0/0"))
        txn.put(b"PETCT_b/0/0/1", store.encode(record, None))
        txn.put(b"PETCT_b/0/0/0", store.encode({"suv": 0.0, "ct": -1000}, None))
    env.close()
    reader = store.TileStore(path)
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


def test_other_format_version_asks_for_a_repack(packed, tmp_path):
    path, env = _writable_copy(packed[0], tmp_path / "old.lmdb")
    with env.begin(write=True) as txn:
        meta = store.decode(txn.get(store.META_KEY))
        txn.put(store.META_KEY, store.encode({**meta, "format_version": 2}, None))
    env.close()
    with pytest.raises(store.StoreError, match=r"old.lmdb: format version 2, expected 3.*re-pack"):
        _ = store.TileStore(path).meta


def test_empty_missing_and_corrupt_databases(tmp_path):
    with pytest.raises(store.StoreError, match=r"no data.mdb"):
        _ = store.TileStore(tmp_path / "nothing.lmdb").meta
    empty = tmp_path / "empty.lmdb"
    lmdb.open(str(empty), subdir=True).close()
    with pytest.raises(store.StoreError, match="empty or incompletely written"):
        _ = store.TileStore(empty).meta
    corrupt = tmp_path / "corrupt.lmdb"
    corrupt.mkdir()
    (corrupt / "data.mdb").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(store.StoreError, match=r"corrupt.lmdb"):
        _ = store.TileStore(corrupt).meta


def test_encode_record_choices():
    air = {
        "suv": np.zeros((4, 16, 16), np.float16),
        "ct": np.full((4, 16, 16), -1000, np.int16),
        "steps": np.full((4, 16, 16), 7, np.uint8),
    }
    constant = store.encode_record(air, "gzip", 1, 0.35)
    assert constant[:1] == b"\x80"  # nothing to compress
    assert store.decode(constant) == {"suv": 0.0, "ct": -1000, "steps": 7}
    rng = np.random.default_rng(0)
    noise = rng.integers(-1000, 1000, (4, 16, 16)).astype(np.int16)
    body = {"suv": noise.astype(np.float16), "ct": noise, "steps": np.zeros_like(noise, np.uint8)}
    body["steps"][0, 0, 0] = 1
    plain = store.encode_record(body, "gzip", 1, 0.35)
    assert plain[:1] == b"\x80"  # noise compresses poorly: all three plain, steps included
    decoded = store.decode(plain)
    for name, tile in body.items():
        np.testing.assert_array_equal(decoded[name], tile)
        assert decoded[name].dtype == tile.dtype
    assert store.encode_record(body, "gzip", 1, 1.0)[:2] == b"\x1f\x8b"
    edge = {**air, "suv": air["suv"].copy()}
    edge["suv"][1, 2, 3] = 2.5
    packed = store.encode_record(edge, "gzip", 1, 0.35)
    assert packed[:2] == b"\x1f\x8b"
    assert store.decode(packed)["ct"] == -1000
    np.testing.assert_array_equal(store.decode(packed)["suv"], edge["suv"])
    with pytest.raises(ValueError, match="unsupported codec"):
        store.encode(noise, "lz5")
