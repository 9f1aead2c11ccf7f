"""PatchDataset: crops equal the NIfTI data, padding, flips, sampling, determinism, batches."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stepseg import channels, data, nifti, pack, presets, stepmap, tilestore
from stepseg.distributed import DistContext
from stepseg.settings import PackSettings, TargetsSettings

AFFINE = np.diag([-2.04, -2.04, 3.0, 1.0])  # LPS, as conversions write: packed as written
SPACING = (3.0, 2.04, 2.04)  # (z, y, x) of AFFINE
PATCH = (8, 24, 24)
# the paper preset's eight channels with radii small enough for PATCH (the presets' own radii
# would cover a patch this small, which PatchDataset refuses): six steps of one voxel
SMALL_PAPER = TargetsSettings.from_mapping(
    {
        "preset": "paper",
        "steps": [{"semi_axes_mm": [3.0, 2.04, 2.04], "iterations": 1}] * 6 + ["whole"],
    }
)
SMALL = presets.preset_from_settings(SMALL_PAPER)
CPU = torch.device("cpu")
COMPACT = {"suv": torch.float16, "ct": torch.int16, "steps": torch.uint8}  # as stored


def make_split(tmp_path, target_settings, shapes):
    """Studies with a lesion in every other one; returns the LMDB path and the arrays."""
    rng = np.random.default_rng(7)
    arrays = {}
    for k, (study, shape) in enumerate(shapes.items()):
        folder = tmp_path / study
        suv = rng.gamma(2.0, 0.8, shape).astype(np.float32)
        ct = rng.integers(-1024, 1400, shape).astype(np.int16)
        seg = np.zeros(shape, bool)
        if k % 2 == 0:
            seg[shape[0] // 2, 2:4, shape[2] - 3] = True
        preset = presets.preset_from_settings(target_settings)
        steps = stepmap.step_map(seg, preset.voxel_steps(SPACING))
        for name, array in (("SUV", suv), ("CTres", ct), ("steps", steps)):
            nifti.save(nifti.Volume(array, AFFINE), folder / f"{name}.nii.gz")
        arrays[study] = (suv.astype(np.float16), ct, steps)
    folders = [tmp_path / s for s in shapes]
    path = tmp_path / "train.lmdb"
    pack.pack_split(
        studies=list(shapes),
        suv_paths=[f / "SUV.nii.gz" for f in folders],
        ctres_paths=[f / "CTres.nii.gz" for f in folders],
        steps_paths=[f / "steps.nii.gz" for f in folders],
        out_dir=path,
        settings=PackSettings.from_mapping(
            {"codec": "gzip", "level": 1, "tile_shape": [4, 16, 16]}
        ),
        target_settings=target_settings,
    )
    return path, arrays


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    shapes = {"PETCT_big": (20, 40, 44), "PETCT_free": (12, 30, 30), "PETCT_small": (5, 20, 30)}
    return make_split(tmp_path_factory.mktemp("data"), SMALL_PAPER, shapes)


def expected_patch(arrays, origin, flips, preset=SMALL):
    """Reference crop (SUV, HU, steps): pad, cut, flip, straight from the stored arrays; the
    steps are those of the crop's own lesion voxels (step_map is checked against scipy in
    test_targets)."""
    suv, ct, steps = arrays
    pads = [
        (max(-o, 0), max(o + p - n, 0)) for o, p, n in zip(origin, PATCH, suv.shape, strict=True)
    ]
    start = [o + before for o, (before, _) in zip(origin, pads, strict=True)]
    box = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
    out = []
    for array, fill in ((suv, 0), (ct, -1024), (steps == 0, False)):
        padded = np.pad(array, pads, constant_values=fill)[box]
        axes = tuple(a for a, f in enumerate(flips) if f)
        out.append(np.flip(padded, axes) if axes else padded)
    out[2] = stepmap.step_map(out[2], preset.voxel_steps(SPACING))
    return out


def test_samples_equal_reference_crops_with_padding_and_flips(split):
    path, arrays = split
    dataset = data.PatchDataset(path, PATCH, 60, 1.0, 0.5, seed=3)
    seen_pad = seen_flip = False
    for index in range(60):
        study, origin, flips = dataset.sample(index)
        name = dataset.studies[study]
        sample = dataset[index]
        assert sample["study"] == name
        expected = expected_patch(arrays[name], origin, flips)
        for key, dtype, crop in zip(COMPACT, COMPACT.values(), expected, strict=True):
            assert sample[key].shape == (1, *PATCH) and sample[key].dtype == dtype
            np.testing.assert_array_equal(sample[key][0].numpy(), crop)
        seen_pad |= min(origin) < 0
        seen_flip |= any(flips)
    assert seen_pad and seen_flip


def test_padding_is_air_and_the_whole_step_covers_it_only_with_a_lesion_in_the_crop(split):
    path, _ = split
    dataset = data.PatchDataset(path, PATCH, 200, 1.0, 0.0, seed=0, flips=False)
    small = dataset.studies.index("PETCT_small")  # 5 slices, a lesion on slice 2
    seen = set()
    for index in (i for i in range(200) if dataset.sample(i)[0] == small):
        _, origin, _ = dataset.sample(index)
        sample = dataset[index]
        before = -origin[0]
        after = before + 5
        has_lesion = bool((sample["steps"] == 0).any())
        for part in (slice(0, before), slice(after, None)):
            assert (sample["suv"][0, part] == 0).all() and (sample["ct"][0, part] == -1024).all()
            # with a lesion in the crop the whole-crop step (7) or a nearer one covers padding
            assert ((sample["steps"][0, part] != 255) == has_lesion).all()
        image, _ = data.device_batch({k: sample[k][None] for k in COMPACT}, torch.device("cpu"))
        assert (image[0, 1, after:] == 0).all()  # padding is -1024 HU: normalised CT 0
        seen.add(has_lesion)
    assert seen == {True, False}


def test_lesion_oversampling_and_centring(split):
    path, _ = split
    dataset = data.PatchDataset(path, PATCH, 400, 4.0, 1.0, seed=1)
    draws = [dataset.studies[dataset.sample(i)[0]] for i in range(400)]
    share = np.mean([d != "PETCT_free" for d in draws])
    assert 0.82 < share < 0.96  # weights 4 : 1 : 4 -> 8/9
    for index in range(40):
        if draws[index] == "PETCT_big":
            assert (dataset[index]["steps"] == 0).any()  # centred on a lesion voxel


@pytest.fixture(scope="module")
def organ_split(tmp_path_factory):
    """Cold body (SUV < 2) with a 2x2x2 hot organ (SUV 12) in both studies, a lesion in one:
    crops centred on the organ or the lesion have origins a random crop almost never has."""
    tmp_path = tmp_path_factory.mktemp("organ")
    rng = np.random.default_rng(11)
    shape = (24, 64, 64)
    names = ["PETCT_lesion", "PETCT_organ"]
    for k, study in enumerate(names):
        suv = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        suv[10:12, 20:22, 40:42] = 12.0
        seg = np.zeros(shape, bool)
        if k == 0:
            seg[14, 44:46, 20] = True
            suv[seg] = 8.0
        ct = rng.integers(-1024, 1400, shape).astype(np.int16)
        steps = stepmap.step_map(seg, SMALL.voxel_steps(SPACING))
        for name, array in (("SUV", suv), ("CTres", ct), ("steps", steps)):
            nifti.save(nifti.Volume(array, AFFINE), tmp_path / study / f"{name}.nii.gz")
    path = tmp_path / "train.lmdb"
    folders = [tmp_path / s for s in names]
    pack.pack_split(
        studies=names,
        suv_paths=[f / "SUV.nii.gz" for f in folders],
        ctres_paths=[f / "CTres.nii.gz" for f in folders],
        steps_paths=[f / "steps.nii.gz" for f in folders],
        out_dir=path,
        settings=PackSettings.from_mapping(
            {"codec": "gzip", "level": 1, "tile_shape": [8, 32, 32], "hot_suv_min": 3.0}
        ),
        target_settings=SMALL_PAPER,
    )
    return path


def centring(dataset, index):
    """ "lesion", "hot" or None: which stored voxel sample `index` is centred on."""
    study, origin, _ = dataset.sample(index)
    centre = tuple(o + p // 2 for o, p in zip(origin, PATCH, strict=True))
    for kind, voxels in (("lesion", dataset.lesion_voxels), ("hot", dataset.hot_voxels)):
        if any(tuple(int(c) for c in v) == centre for v in voxels[study]):
            return kind
    return None


def test_hot_centring_share_and_lesion_crops_unchanged(organ_split):
    n = 1000
    hard = data.PatchDataset(organ_split, PATCH, n, 1.0, 0.5, seed=2, hot_centre_fraction=0.3)
    assert [len(v) for v in hard.hot_voxels] == [8, 8]  # the organ; the lesion is not a negative
    kinds = [centring(hard, i) for i in range(n)]
    studies = [hard.studies[hard.sample(i)[0]] for i in range(n)]
    for study, lesion_share in (("PETCT_lesion", 0.5), ("PETCT_organ", 0.0)):
        own = [k for k, s in zip(kinds, studies, strict=True) if s == study]
        assert len(own) > 400
        assert abs(np.mean([k == "hot" for k in own]) - 0.3) < 0.07
        assert abs(np.mean([k == "lesion" for k in own]) - lesion_share) < 0.07
    index = kinds.index("hot")
    centre = tuple(p // 2 for p in PATCH)
    sample = hard[index]
    assert sample["steps"][(0, *centre)] != 0  # a hot voxel, not a lesion
    flipped_centre = tuple(
        p - 1 - c if f else c for p, c, f in zip(PATCH, centre, hard.sample(index)[2], strict=True)
    )
    assert sample["suv"][(0, *flipped_centre)] > sample["suv"][0].float().median()
    # without hard negatives: the same lesion crops (same draws), never an organ-centred one
    plain = data.PatchDataset(organ_split, PATCH, n, 1.0, 0.5, seed=2)
    plain_kinds = [centring(plain, i) for i in range(n)]
    assert "hot" not in plain_kinds
    for i in range(n):
        if kinds[i] == "lesion":
            assert plain.sample(i) == hard.sample(i)


def test_hot_centring_is_deterministic_and_validated(organ_split):
    first, second = (
        data.PatchDataset(organ_split, PATCH, 64, 1.0, 0.4, seed=9, hot_centre_fraction=0.6)
        for _ in range(2)
    )
    draws = [first.sample(i) for i in range(64)]
    assert draws == [second.sample(i) for i in range(64)]
    assert sum(centring(first, i) == "hot" for i in range(64)) > 20
    first.set_epoch(3)
    assert [first.sample(i) for i in range(64)] != draws
    with pytest.raises(ValueError, match="hot_centre_fraction"):
        data.PatchDataset(organ_split, PATCH, 4, 1.0, 0.5, seed=0, hot_centre_fraction=0.6)
    with pytest.raises(ValueError, match="hot_centre_fraction"):
        data.PatchDataset(organ_split, PATCH, 4, 1.0, 0.5, seed=0, hot_centre_fraction=-0.1)
    # fractions that sum to 1 exactly in decimal, though not after `1 - lesion` in binary
    for lesion, hot in ((0.8, 0.2), (0.7, 0.3), (0.9, 0.1)):
        full = data.PatchDataset(
            organ_split, PATCH, 64, 1.0, lesion, seed=9, hot_centre_fraction=hot
        )
        with_lesions = [i for i in range(64) if len(full.lesion_voxels[full.sample(i)[0]])]
        assert with_lesions
        assert all(centring(full, i) is not None for i in with_lesions)


def test_deterministic_across_workers_and_epochs(split):
    path, _ = split
    dataset = data.PatchDataset(path, PATCH, 8, 2.0, 0.5, seed=5)
    serial = list(data.make_loader(dataset, batch_size=4, num_workers=0))
    parallel = list(data.make_loader(dataset, batch_size=4, num_workers=2))
    for a, b in zip(serial, parallel, strict=True):
        assert a["study"] == b["study"]
        for key in COMPACT:
            assert torch.equal(a[key], b[key])
    first = [dataset.sample(i) for i in range(8)]
    dataset.set_epoch(1)
    assert [dataset.sample(i) for i in range(8)] != first
    dataset.set_epoch(0)
    assert [dataset.sample(i) for i in range(8)] == first


def test_worker_batches_are_read_in_shared_memory_and_split_over_ranks(split):
    """A worker reads a whole batch into shared tensors (no collation copy); each DDP rank's
    loader gives its contiguous share of every global batch, the same samples as one process."""
    path, _ = split
    dataset = data.PatchDataset(path, PATCH, 10, 2.0, 0.5, seed=6)
    batches = list(data.make_loader(dataset, batch_size=4, num_workers=2))
    assert [len(b["study"]) for b in batches] == [4, 4, 2]
    assert all(b[key].is_shared() for b in batches for key in COMPACT)
    for start, batch in zip(range(0, 10, 4), batches, strict=True):
        for k, index in enumerate(range(start, min(start + 4, 10))):
            sample = dataset[index]
            assert batch["study"][k] == sample["study"]
            for key in COMPACT:
                assert torch.equal(batch[key][k], sample[key])
    shares = [
        list(data.make_loader(dataset, 4, num_workers=1, ctx=DistContext(rank, 2, rank, CPU)))
        for rank in range(2)
    ]
    for rank, share in enumerate(shares):
        for batch, whole in zip(share, batches, strict=True):
            half = len(whole["study"]) // 2
            mine = slice(rank * half, (rank + 1) * half)
            assert batch["study"] == whole["study"][mine]
            for key in COMPACT:
                assert torch.equal(batch[key], whole[key][mine])


def shm_path(tensor: torch.Tensor) -> str:
    """The shared-memory file behind a tensor received from a worker."""
    fd, _ = tensor.untyped_storage()._share_fd_cpu_()
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_worker_storages_are_reused_only_after_the_main_process_let_go(split):
    """Batches the consumer drops come back in the same shared memory; batches it keeps are
    never overwritten, however many follow."""
    path, _ = split
    dataset = data.PatchDataset(path, PATCH, 40, 2.0, 0.5, seed=8)
    expected = [dataset.__getitems__([i, i + 1]) for i in range(0, 40, 2)]
    paths = []
    for batch, reference in zip(data.make_loader(dataset, 2, 1), expected, strict=True):
        paths.append(shm_path(batch["suv"]))
        for key in COMPACT:
            assert torch.equal(batch[key], reference[key])
    assert len(set(paths)) <= data.PREFETCH_FACTOR + 3 < len(paths)
    kept = list(data.make_loader(dataset, 2, 1))
    assert len({shm_path(batch["suv"]) for batch in kept}) == len(kept)
    for batch, reference in zip(kept, expected, strict=True):
        assert batch["study"] == reference["study"]
        for key in COMPACT:
            assert torch.equal(batch[key], reference[key])


def test_released_code_preset_and_expansion_of_a_batch(tmp_path):
    path, _ = make_split(
        tmp_path, TargetsSettings(preset="released_code"), {"PETCT_one": (10, 30, 30)}
    )
    with pytest.raises(ValueError, match="covers a whole patch"):  # reach 9 x 28 x 28 voxels
        data.PatchDataset(path, PATCH, 4, 1.0, 1.0, seed=0)
    patch = (16, 32, 32)
    dataset = data.PatchDataset(path, patch, 4, 1.0, 1.0, seed=0)
    assert dataset.preset == presets.RELEASED_CODE
    batch = next(iter(data.make_loader(dataset, batch_size=4, num_workers=0)))
    image, steps = data.device_batch(batch, torch.device("cpu"))
    out = channels.expand(steps, image, dataset.preset)
    assert out.shape == (4, 8, *patch)
    torch.testing.assert_close(out[:, 0], (steps[:, 0] == 0).float())
    has_lesion = (steps == 0).flatten(1).any(dim=1)
    assert has_lesion.all()  # lesion-centred crops of a lesion study
    assert (steps <= 4).all()  # a crop with a lesion: every voxel reached by the whole step


def test_loader_batches_are_compact_and_become_normalised_inputs(split):
    """Workers ship the stored dtypes (5 bytes a voxel); `device_batch` makes the inputs."""
    path, _ = split
    dataset = data.PatchDataset(path, PATCH, 6, 1.0, 0.5, seed=4)
    batch = next(iter(data.make_loader(dataset, batch_size=3, num_workers=2)))
    assert set(batch) == {*COMPACT, "study"} and len(batch["study"]) == 3
    for key, dtype in COMPACT.items():
        assert batch[key].shape == (3, 1, *PATCH) and batch[key].dtype == dtype
    assert sum(batch[k].element_size() for k in COMPACT) == 5
    image, steps = data.device_batch(batch, torch.device("cpu"))
    assert image.shape == (3, 2, *PATCH) and image.dtype == torch.float32
    assert steps.dtype == torch.uint8 and torch.equal(steps, batch["steps"])
    for k in range(3):  # each patch with its own statistics, as the released code did
        suv = batch["suv"][k, 0].numpy().astype(np.float64)
        log_suv = np.log2(suv + 1)
        foreground = log_suv[log_suv > 0.14]
        pet = (log_suv - foreground.mean()) / max(foreground.std(), 0.01) / 2 + 1
        ct = (np.clip(batch["ct"][k, 0].numpy(), -1000, 1000) + 1000) / 500
        np.testing.assert_allclose(image[k, 0].numpy(), pet, atol=2e-5)
        np.testing.assert_allclose(image[k, 1].numpy(), ct, atol=1e-6)


def test_bad_arguments_and_missing_database(tmp_path, split):
    with pytest.raises(ValueError, match="lesion_centre_fraction"):
        data.PatchDataset(split[0], PATCH, 4, 1.0, 1.5, seed=0)
    with pytest.raises(tilestore.StoreError, match=r"no data.mdb"):
        data.PatchDataset(tmp_path / "missing.lmdb", PATCH, 4, 1.0, 0.5, seed=0)


def pack_one_study(folder: Path, out: Path) -> Path:
    """The LMDB `out` of the one study whose SUV, CTres and steps files are in `folder`."""
    pack.pack_split(
        studies=[folder.name],
        suv_paths=[folder / "SUV.nii.gz"],
        ctres_paths=[folder / "CTres.nii.gz"],
        steps_paths=[folder / "steps.nii.gz"],
        out_dir=out,
        settings=PackSettings.from_mapping(
            {"codec": "gzip", "level": 1, "tile_shape": [8, 32, 32]}
        ),
        target_settings=SMALL_PAPER,
    )
    return out


def test_lesion_centred_crops_are_jittered_uniformly_up_to_the_fractions(tmp_path):
    """The released code's ranges: up to 15/16 of the half-patch in z, 2/3 in-plane."""
    shape, lesion = (40, 96, 96), (20, 48, 48)
    seg = np.zeros(shape, bool)
    seg[lesion] = True
    folder = tmp_path / "PETCT_one"
    for name, array in (
        ("SUV", np.ones(shape, np.float32)),
        ("CTres", np.zeros(shape, np.int16)),
        ("steps", stepmap.step_map(seg, SMALL.voxel_steps(SPACING))),
    ):
        nifti.save(nifti.Volume(array, AFFINE), folder / f"{name}.nii.gz")
    path = pack_one_study(folder, tmp_path / "one.lmdb")
    dataset = data.PatchDataset(
        path, PATCH, 600, 1.0, 1.0, seed=0, crop_jitter=(0.9375, 2 / 3, 2 / 3)
    )
    shifts = np.array(
        [
            [o + p // 2 - c for o, p, c in zip(dataset.sample(i)[1], PATCH, lesion, strict=True)]
            for i in range(600)
        ]
    )
    # half-patches 4, 12, 12: round(0.9375 * 4) = 4 slices, round(2/3 * 12) = 8 voxels
    for axis, reach in enumerate((4, 8, 8)):
        assert set(shifts[:, axis]) == set(range(-reach, reach + 1))
        assert abs(shifts[:, axis].mean()) < 0.1 * reach
    unjittered = data.PatchDataset(path, PATCH, 50, 1.0, 1.0, seed=0)
    assert all(unjittered.sample(i)[1] == (16, 36, 36) for i in range(50))


@pytest.fixture(scope="module")
def two_lesion_split(tmp_path_factory):
    """One study with a 200-voxel lesion and, far from it, a 1-voxel one."""
    tmp_path = tmp_path_factory.mktemp("components")
    rng = np.random.default_rng(5)
    shape = (24, 64, 64)
    suv = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    ct = rng.integers(-1024, 1400, shape).astype(np.int16)
    seg = np.zeros(shape, bool)
    seg[4:6, 10:20, 10:20] = True  # 200 voxels
    seg[18, 50, 50] = True  # 1 voxel
    steps = stepmap.step_map(seg, SMALL.voxel_steps(SPACING))
    for name, array in (("SUV", suv), ("CTres", ct), ("steps", steps)):
        nifti.save(nifti.Volume(array, AFFINE), tmp_path / "PETCT_two" / f"{name}.nii.gz")
    return pack_one_study(tmp_path / "PETCT_two", tmp_path / "train.lmdb")


def test_component_centres_draw_each_lesion_alike_and_voxel_centres_by_size(two_lesion_split):
    """Every crop lesion-centred, no jitter: per voxel the 1-voxel lesion is the centre of about
    1 crop in 201, per component of about every other one."""
    n = 2000
    small = (18, 50, 50)
    share = {}
    for mode in ("voxel", "component"):
        dataset = data.PatchDataset(
            two_lesion_split, PATCH, n, 1.0, 1.0, seed=3, lesion_centres=mode
        )
        centres = [
            tuple(o + p // 2 for o, p in zip(dataset.sample(i)[1], PATCH, strict=True))
            for i in range(n)
        ]
        share[mode] = np.mean([c == small for c in centres])
    assert share["voxel"] < 0.02
    assert 0.45 < share["component"] < 0.55
    components = data.PatchDataset(two_lesion_split, PATCH, 1, 1.0, 1.0, seed=0).store.study_meta(
        "PETCT_two"
    )["lesion_components"]
    assert [len(c) for c in components] == [64, 1]  # at most pack.COMPONENT_VOXELS each
    assert [tuple(int(v) for v in c[0]) for c in components][1] == small
    with pytest.raises(ValueError, match="lesion_centres must be voxel or component, got 'blob'"):
        data.PatchDataset(two_lesion_split, PATCH, 1, 1.0, 1.0, seed=0, lesion_centres="blob")
