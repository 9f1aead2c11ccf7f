"""The pack stage: what it stores of a study (float16 SUV, whole-HU int16 CT, the step map,
lesion and hot voxel indices) and the studies it refuses, read back through the real LMDB.

The tile layout and its reader are tested in test_tilestore.py, whose study builders these
tests share."""

import logging

import lmdb
import numpy as np
import pytest
from test_tilestore import AFFINE, PACK, TARGETS, full_box, make_study, pack_studies

from stepseg import nifti, pack, tilestore
from stepseg.errors import StudyError
from stepseg.settings import PackSettings


def test_ct_is_stored_in_whole_hu_and_clipped_to_int16_with_a_log(tmp_path, caplog):
    """CTres is interpolated: its fractions of a HU are rounded (half to even); beyond int16,
    which only a widened `checks.ct_hu_range` lets through, it is clipped with a warning."""
    folder = tmp_path / "PETCT_frac"
    suv, _, steps = make_study(folder, (8, 16, 16), 4)
    ct = np.full(suv.shape, -1000.2, np.float32)
    ct[1, 2, 3:9] = [12.4, 12.5, 13.5, -0.6, 40000.0, -33000.0]
    nifti.save(nifti.Volume(ct, AFFINE), folder / "CTres.nii.gz")
    with caplog.at_level(logging.WARNING):
        pack.pack_split(
            studies=["PETCT_frac"],
            suv_paths=[folder / "SUV.nii.gz"],
            ctres_paths=[folder / "CTres.nii.gz"],
            steps_paths=[folder / "steps.nii.gz"],
            out_dir=tmp_path / "train.lmdb",
            settings=PackSettings.from_mapping(PACK),
            target_settings=TARGETS,
            ct_hu_range=(-40000.0, 40000.0),
        )
    assert f"study PETCT_frac ({folder / 'CTres.nii.gz'}): 2 CT voxels outside int16 clipped" in (
        caplog.text
    )
    volumes = tilestore.TileStore(tmp_path / "train.lmdb").read_patch(
        "PETCT_frac", full_box(ct.shape)
    )
    assert volumes["ct"][1, 2, 3:9].tolist() == [12, 12, 14, -1, 32767, -32768]
    expected = np.full(ct.shape, -1000, np.int16)
    expected[1, 2, 3:9] = [12, 12, 14, -1, 32767, -32768]
    np.testing.assert_array_equal(volumes["ct"], expected)
    np.testing.assert_array_equal(volumes["suv"], suv.astype(np.float16))
    np.testing.assert_array_equal(volumes["steps"], steps)


def test_lesion_index_is_a_capped_deterministic_subset_in_scan_order(tmp_path):
    folder = tmp_path / "PETCT_big"
    suv, _, _ = make_study(folder, (8, 16, 16), 5, lesion=False)
    lesion = np.zeros(suv.shape, np.uint8)  # a 2 x 4 x 5 block: 40 lesion voxels
    lesion[3:5, 6:10, 5:10] = 1
    steps = np.where(lesion == 1, 0, 1).astype(np.uint8)
    nifti.save(nifti.Volume(steps, AFFINE), folder / "steps.nii.gz")
    make_study(tmp_path / "PETCT_other", (8, 16, 16), 6)
    settings = {**PACK, "lesion_index_max": 10}
    indices = []
    for order, out in (([folder], "one.lmdb"), ([tmp_path / "PETCT_other", folder], "two.lmdb")):
        meta = tilestore.TileStore(pack_studies(tmp_path, order, out, settings)).study_meta(
            "PETCT_big"
        )
        assert meta["has_lesions"] and meta["lesion_voxel_count"] == 40
        indices.append(meta["lesion_voxels"])
    index = indices[0]
    assert index.dtype == np.uint16 and index.shape == (10, 3)
    assert all(lesion[tuple(v)] for v in index)
    assert index.tolist() == sorted(index.tolist()) and len(np.unique(index, axis=0)) == 10
    np.testing.assert_array_equal(indices[1], index)  # seeded by the study, not its position
    whole = tilestore.TileStore(pack_studies(tmp_path, [folder], "all.lmdb")).study_meta(
        "PETCT_big"
    )
    assert whole["lesion_voxels"].tolist() == np.argwhere(lesion).tolist()  # under the cap: all


def test_hot_voxel_index_holds_high_uptake_outside_lesions(tmp_path):
    shapes = {"PETCT_a": (21, 37, 45), "PETCT_b": (9, 20, 18)}
    data = {
        name: make_study(tmp_path / name, shape, seed, lesion=(name == "PETCT_a"))
        for seed, (name, shape) in enumerate(shapes.items())
    }
    reader = tilestore.TileStore(pack_studies(tmp_path, [tmp_path / name for name in shapes]))
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
    suv, _, steps = data["PETCT_a"]
    capped = tilestore.TileStore(
        pack_studies(tmp_path, [folder], "capped.lmdb", {**PACK, "hot_index_max": 10})
    )
    meta = capped.study_meta("PETCT_a")
    assert len(meta["hot_voxels"]) == 10 and meta["hot_voxel_count"] > 10
    assert all(steps[tuple(v)] != 0 and suv[tuple(v)] >= 3.0 for v in meta["hot_voxels"])
    raised = tilestore.TileStore(
        pack_studies(tmp_path, [folder], "high.lmdb", {**PACK, "hot_suv_min": 5.0})
    )
    assert raised.study_meta("PETCT_a")["hot_voxel_count"] == int(((suv >= 5) & (steps != 0)).sum())


def test_float16_overflow_is_clipped_with_a_log(tmp_path, caplog):
    make_study(tmp_path / "PETCT_hot", (8, 16, 16), 3, suv_max=70000.0)
    with caplog.at_level(logging.WARNING):
        path = pack_studies(tmp_path, [tmp_path / "PETCT_hot"])
    assert "PETCT_hot" in caplog.text and "clipped" in caplog.text
    value = tilestore.TileStore(path).read_patch("PETCT_hot", (slice(0, 1),) * 3)["suv"]
    assert float(value[0, 0, 0]) == 65504.0


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("shape", r"CTres.nii.gz: CTres shape \(8, 16, 17\) \(z, y, x\) differs"),
        ("nan", "SUV.nii.gz: SUV has 1 NaN and 0 infinite voxels"),
        ("negative", r"SUV.nii.gz: SUV has 1 negative voxels \(min -0.25\)"),
        ("ct", r"CTres.nii.gz: CTres has 1 voxels outside the plausible range \[-1100, 4000\]"),
        ("steps grid", r"steps.nii.gz: steps shape \(8, 16, 17\) \(z, y, x\) differs"),
        ("steps dtype", "steps.nii.gz: step map is not uint8"),
    ],
)
def test_bad_study_fails_atomically_naming_it(tmp_path, problem, message):
    make_study(tmp_path / "PETCT_ok", (8, 16, 16), 1)
    suv, ct, steps = make_study(tmp_path / "PETCT_bad", (8, 16, 16), 2)
    if problem == "shape":
        ct = np.zeros((8, 16, 17), np.int16)
    elif problem.startswith("steps"):
        if problem == "steps grid":
            steps = np.zeros((8, 16, 17), np.uint8)
        else:
            steps = steps.astype(np.int16)
            steps[0, 0, 0] = 300
        nifti.save(nifti.Volume(steps, AFFINE), tmp_path / "PETCT_bad" / "steps.nii.gz")
    elif problem == "ct":
        ct[2, 3, 4] = -5000  # below any CT, padding values included
    else:
        suv[1, 1, 1] = np.nan if problem == "nan" else -0.25
    nifti.save(nifti.Volume(suv, AFFINE), tmp_path / "PETCT_bad" / "SUV.nii.gz")
    nifti.save(nifti.Volume(ct, AFFINE), tmp_path / "PETCT_bad" / "CTres.nii.gz")
    with pytest.raises(StudyError, match=message) as error:
        pack_studies(tmp_path, [tmp_path / "PETCT_ok", tmp_path / "PETCT_bad"])
    assert f"study PETCT_bad, file {tmp_path / 'PETCT_bad'}" in str(error.value)
    assert not any(p.name.startswith(("train.lmdb", ".train.lmdb")) for p in tmp_path.iterdir())


def test_unequal_path_lists_are_refused(tmp_path):
    with pytest.raises(ValueError, match="studies, SUV, CTres and step-map paths must have equal"):
        pack.pack_split(
            studies=["PETCT_a", "PETCT_b"],
            suv_paths=[tmp_path / "a" / "SUV.nii.gz"],
            ctres_paths=[tmp_path / "a" / "CTres.nii.gz"],
            steps_paths=[tmp_path / "a" / "steps.nii.gz"],
            out_dir=tmp_path / "train.lmdb",
            settings=PackSettings(),
            target_settings=TARGETS,
        )
    assert not (tmp_path / "train.lmdb").exists()


def test_unreadable_suv_header_is_named_before_anything_is_packed(tmp_path):
    make_study(tmp_path / "PETCT_cut", (8, 16, 16), 1)
    suv = tmp_path / "PETCT_cut" / "SUV.nii.gz"
    suv.write_bytes(suv.read_bytes()[:40])  # the size of the database is read from here first
    with pytest.raises(StudyError, match=rf"^study PETCT_cut, file {suv}: cannot read NIfTI"):
        pack_studies(tmp_path, [tmp_path / "PETCT_cut"])


def test_full_disk_is_reported_with_the_lmdb_path(small_disk, tmp_path):
    """LMDB reports the short write as `mdb_txn_commit: Input/output error`, naming no file."""
    make_study(tmp_path / "PETCT_big", (40, 64, 64), 0)  # 0.43 MB packed
    with pytest.raises(tilestore.StoreError) as error:
        pack_studies(small_disk, [tmp_path / "PETCT_big"])
    assert str(error.value).startswith(f"LMDB {small_disk / 'train.lmdb'}: writing failed (")
    assert str(error.value).endswith("); the disk may be full")
    assert isinstance(error.value.__cause__, lmdb.Error)
    assert list(small_disk.iterdir()) == []
