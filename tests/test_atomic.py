import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stepseg import nifti, pack, presets, stepmap, tilestore
from stepseg.atomic import TEMP_MARK, NoSpaceError, atomic_dir, atomic_file
from stepseg.convert import convert_study
from stepseg.names import NIFTI_NAMES
from stepseg.settings import ConvertSettings, PackSettings, TargetsSettings
from stepseg.synthetic import source

ROOT = Path(__file__).resolve().parents[1]


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


def test_temps_follow_the_naming_scheme(tmp_path):
    pid = os.getpid()
    with atomic_file(tmp_path / "CT.nii.gz") as tmp:
        assert re.fullmatch(rf"\.CT\.nii\.gz\.stepseg-tmp-{pid}-\w{{8}}\.nii\.gz", tmp.name)
    with atomic_dir(tmp_path / "val.lmdb") as tmp:
        assert re.fullmatch(rf"\.val\.lmdb\.stepseg-tmp-{pid}-\w{{8}}", tmp.name)


def test_a_write_removes_the_stale_temps_of_its_target_and_no_others(tmp_path):
    """Temps of other targets in the folder may be other jobs' live writes: never touched."""
    stale_file = tmp_path / f".CT.nii.gz{TEMP_MARK}4711-k2j8x0qa.nii.gz"
    stale_file.write_text("half a CT")
    stale_dir = tmp_path / f".val.lmdb{TEMP_MARK}4711-3bd0c1aw"
    stale_dir.mkdir()
    (stale_dir / "data.mdb").write_text("half a database")
    others = [
        tmp_path / f".CTres.nii.gz{TEMP_MARK}4712-q8c2m0xz.nii.gz",  # another job's, live
        tmp_path / f".train.lmdb{TEMP_MARK}4713-zz81ka0p",
        tmp_path / ".CT.nii.gz.notes",  # not a temp
    ]
    for other in others:
        other.write_text("keep")
    with atomic_file(tmp_path / "CT.nii.gz") as tmp:
        tmp.write_text("CT")
    with atomic_dir(tmp_path / "val.lmdb") as tmp:
        (tmp / "data.mdb").write_text("database")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["CT.nii.gz", "val.lmdb", *(p.name for p in others)]
    )
    assert all(p.read_text() == "keep" for p in others)


def test_out_of_space_names_the_output_and_leaves_no_temp(full_disk):
    volume = nifti.Volume(np.arange(4096, dtype=np.float32).reshape(16, 16, 16), np.eye(4))
    with pytest.raises(NoSpaceError) as error:
        nifti.save(volume, full_disk / "pred.nii.gz")
    assert str(error.value) == (
        f"[Errno 28] No space left on device while writing {full_disk / 'pred.nii.gz'}: "
        "the disk or quota may be full"
    )
    with (
        pytest.raises(NoSpaceError, match=f"while writing {full_disk / 'db.lmdb'}: the disk"),
        atomic_dir(full_disk / "db.lmdb") as tmp,
    ):
        (tmp / "data.mdb").write_bytes(bytes(8192))
    assert [p.name for p in full_disk.iterdir()] == ["filler"]


# --------------------------------------------------------------------------------------------
# real jobs killed while writing, then rerun

# Runs in a fresh interpreter before the job's code and SIGKILLs the process at `kill_at`:
# "output": when a temp is first renamed onto an output (every temp written, none renamed);
# "third write": when a third temp is opened for writing (two written, the third empty).
KILLER = """
import json, os, signal, sys
from stepseg.atomic import TEMP_MARK

args = json.loads(sys.argv[1])
kill_at = args.pop("kill_at")
writes = []


def is_temp(path):
    return isinstance(path, str | os.PathLike) and TEMP_MARK in os.fspath(path)


def killer(event, hooked):
    if event == "os.rename" and kill_at == "output":
        due = is_temp(hooked[0]) and not is_temp(hooked[1])
    elif event == "open" and kill_at == "third write" and is_temp(hooked[0]):
        writes.extend(["w"] if "w" in str(hooked[1]) else [])
        due = len(writes) == 3
    else:
        due = False
    if due:
        os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(killer)
"""
TRUTH_SETTINGS = ConvertSettings(suv_reference_time="series", ctres_interpolation="linear")
PACK = {"codec": "gzip", "level": 1, "tile_shape": [8, 16, 16], "max_compressed_ratio": 0.35}


def run_killed(job: str, args: dict, kill_at: str = "output") -> int:
    """Run `job` (Python code using `args`) in a subprocess that is killed by SIGKILL at
    `kill_at` (see KILLER); return the process id (which the temps' names carry)."""
    process = subprocess.Popen(
        [sys.executable, "-c", KILLER + job, json.dumps({**args, "kill_at": kill_at})],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, stderr
    return process.pid


@pytest.fixture(scope="module")
def raw_study(tmp_path_factory, micro_synthetic_settings) -> tuple[str, Path]:
    """A lesion study of the synthetic cohort, as downloaded (DICOM series and truth)."""
    settings = micro_synthetic_settings
    row = next(r for r in source.list_studies(settings) if r["has_lesions"])
    raw = tmp_path_factory.mktemp("raw") / row["study_id"]
    raw.mkdir()
    source.fetch_study(settings, row, raw)
    return row["study_id"], raw


@pytest.mark.parametrize(("kill_at", "temps", "written"), [("output", 5, 5), ("third write", 3, 2)])
def test_killed_conversion_leaves_temps_that_its_rerun_removes(
    raw_study, tmp_path, kill_at, temps, written
):
    study, raw = raw_study
    out = tmp_path / "nifti" / study
    outputs = {name: str(out / f"{name}.nii.gz") for name in NIFTI_NAMES}
    job = """
from stepseg.convert import convert_study
from stepseg.settings import ConvertSettings
settings = ConvertSettings.from_mapping(args["settings"])
convert_study(args["study"], args["raw"], args["outputs"], settings)
"""
    settings = TRUTH_SETTINGS.to_dict()
    args = {"study": study, "raw": str(raw), "outputs": outputs, "settings": settings}
    pid = run_killed(job, args, kill_at)
    temp = re.compile(rf"\.(\w+)\.nii\.gz\.stepseg-tmp-{pid}-\w{{8}}\.nii\.gz")
    left = {p.name: temp.fullmatch(p.name) for p in out.iterdir()}
    assert all(left.values()), sorted(left)  # only temps of the outputs, no output
    assert len({match[1] for match in left.values()} & set(NIFTI_NAMES)) == len(left) == temps
    assert sum((out / name).stat().st_size > 0 for name in left) == written

    convert_study(study, raw, outputs, TRUTH_SETTINGS)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.nii.gz" for n in NIFTI_NAMES)
    seg, true_seg = (nifti.load(d / "SEG.nii.gz", study) for d in (out, raw / "truth"))
    np.testing.assert_array_equal(seg.array, true_seg.array)
    assert seg.array.sum() > 0
    suv, true_suv = (nifti.load(d / "SUV.nii.gz", study) for d in (out, raw / "truth"))
    body = true_suv.array > 0.5
    relative = np.abs(suv.array[body] - true_suv.array[body]) / true_suv.array[body]
    assert relative.max() < 1e-4  # as tests/test_convert.py: only float32 rounding


def test_killed_packing_leaves_a_temp_database_that_its_rerun_removes(raw_study, tmp_path):
    study, raw = raw_study
    inputs = tmp_path / "inputs"
    outputs = {name: inputs / f"{name}.nii.gz" for name in NIFTI_NAMES}
    convert_study(study, raw, outputs, TRUTH_SETTINGS)
    seg = nifti.load(outputs["SEG"], study)
    steps = stepmap.step_map(seg.array > 0, presets.RELEASED_CODE.voxel_steps(seg.spacing_zyx))
    nifti.save(nifti.Volume(steps, seg.affine), inputs / "steps.nii.gz", dtype=np.uint8)
    args = {
        "studies": [study],
        "suv_paths": [str(outputs["SUV"])],
        "ctres_paths": [str(outputs["CTres"])],
        "steps_paths": [str(inputs / "steps.nii.gz")],
        "out_dir": str(tmp_path / "lmdb" / "train.lmdb"),
    }
    job = """
from stepseg.pack import pack_split
from stepseg.settings import PackSettings, TargetsSettings
settings = PackSettings.from_mapping(args.pop("settings"))
pack_split(**args, settings=settings, target_settings=TargetsSettings(preset="released_code"))
"""
    pid = run_killed(job, {**args, "settings": PACK})
    (temp,) = (tmp_path / "lmdb").iterdir()
    assert re.fullmatch(rf"\.train\.lmdb\.stepseg-tmp-{pid}-\w{{8}}", temp.name)
    assert (temp / "data.mdb").stat().st_size > 0

    pack.pack_split(
        **args,
        settings=PackSettings.from_mapping(PACK),
        target_settings=TargetsSettings(preset="released_code"),
    )
    assert [p.name for p in (tmp_path / "lmdb").iterdir()] == ["train.lmdb"]
    store = tilestore.TileStore(tmp_path / "lmdb" / "train.lmdb")
    suv = nifti.load(outputs["SUV"], study, dtype=np.float32).array
    patch = store.read_patch(study, tuple(slice(0, n) for n in suv.shape))
    np.testing.assert_array_equal(patch["suv"], suv.astype(np.float16))
    np.testing.assert_array_equal(patch["steps"], steps)
    store.close()
