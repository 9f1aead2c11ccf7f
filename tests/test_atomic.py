import pytest

from stepseg.atomic import atomic_dir, atomic_file


def test_atomic_file_appears_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with atomic_file(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"

    with pytest.raises(RuntimeError), atomic_file(tmp_path / "failed.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "db.lmdb"
    with atomic_dir(target) as tmp:
        (tmp / "data.mdb").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "data.mdb").write_text("v2-half")
        raise RuntimeError("killed")
    assert (target / "data.mdb").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["db.lmdb"]
