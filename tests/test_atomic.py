import os
import stat

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


def test_outputs_get_the_umask_permissions_not_the_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "out.csv") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "db.lmdb") as tmp:
            (tmp / "data.mdb").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "db.lmdb").stat().st_mode) == 0o755
