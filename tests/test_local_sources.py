"""Local sources: a DICOM tree in any layout (`dicom_dir`) and the autoPET NIfTI release."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tcia_server import write_tiny_study

from stepseg import manifest, sources
from stepseg.errors import StudyError
from stepseg.names import NIFTI_NAMES
from stepseg.sources import local

SPLIT = {"seed": 0, "train": 0.5, "val": 0.25, "test": 0.25}


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory):
    """Three studies, two patients, in three layouts: nested, one flat folder, mixed."""
    root = tmp_path_factory.mktemp("tree")
    (root / "README.txt").write_text("not DICOM")
    uids = {
        "A_2": write_tiny_study(root, "A", "20040101", seed=1, empty_seg=True),
        "A_1": write_tiny_study(root, "A", "20030323", seed=2, folder_of=lambda m: "dump"),
        "B_1": write_tiny_study(
            root, "B", "20050505", seed=3, folder_of=lambda m: "b/seg" if m == "SEG" else "b"
        ),
    }
    return root, uids


def test_dicom_dir_lists_studies_by_tags_whatever_the_layout(dicom_tree):
    root, uids = dicom_tree
    records = local.dicom_dir.list_studies({"path": str(root)})
    assert [(r["study_id"], r["patient_id"], r["has_lesions"]) for r in records] == [
        ("A_1", "A", True),
        ("A_2", "A", False),
        ("B_1", "B", True),
    ]
    by_id = {r["study_id"]: r for r in records}
    for name, study_uids in uids.items():
        assert by_id[name]["study_uid"] == study_uids["StudyInstanceUID"]
        assert by_id[name]["pet_series_uid"] == study_uids["PT"]
    assert by_id["A_1"]["ct_series_dirs"] == str((root / "dump").resolve())
    assert by_id["B_1"]["seg_series_dirs"] == str((root / "b" / "seg").resolve())
    assert (by_id["A_1"]["ct_series_images"], by_id["A_1"]["seg_series_images"]) == (6, 1)


@pytest.mark.parametrize("mode", ["symlink", "copy"])
def test_dicom_dir_fetch_links_or_copies_each_series(dicom_tree, tmp_path, mode):
    root, uids = dicom_tree
    row = local.dicom_dir.list_studies({"path": str(root)})[0]  # A_1, in the mixed folder
    out = tmp_path / "raw"
    local.dicom_dir.fetch_study({"path": str(root), "link": mode}, row, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{number}.000000-{kind}-{uids['A_1'][kind][-5:]}"
        for number, kind in [(1, "CT"), (2, "PT"), (3, "SEG")]
    )
    ct = sorted((out / row["ct_series"]).iterdir())
    assert len(ct) == 6
    originals = sorted((root / "dump").glob(f"{uids['A_1']['CT'][-8:]}-*.dcm"))
    assert all(p.is_symlink() == (mode == "symlink") for p in ct)
    assert [p.read_bytes() for p in ct] == [p.read_bytes() for p in originals]


def test_dicom_dir_changed_tree_is_reported(tmp_path):
    root = tmp_path / "tree"
    write_tiny_study(root, "C", "20100101")
    row = local.dicom_dir.list_studies({"path": str(root)})[0]
    next((root / "C" / "20100101" / "CT").iterdir()).unlink()
    with pytest.raises(StudyError, match=r"study C_1.*CT series .* has 5 files, 6 when listed"):
        local.dicom_dir.fetch_study({"path": str(root)}, row, tmp_path / "raw")


def cut_in_its_header(path: Path) -> None:
    """Keep the preamble, 'DICM' and 2 of the 4 bytes of the first meta element's value."""
    path.write_bytes(path.read_bytes()[:142])


def test_dicom_file_cut_short_is_named_when_listed_and_when_fetched(tmp_path):
    root = tmp_path / "tree"
    write_tiny_study(root, "C", "20100101")
    row = local.dicom_dir.list_studies({"path": str(root)})[0]
    cut = sorted((root / "C" / "20100101" / "CT").iterdir())[2]
    cut_in_its_header(cut)
    with pytest.raises(StudyError, match=rf"^study C_1, file {cut}: corrupt DICOM file \("):
        local.dicom_dir.fetch_study({"path": str(root)}, row, tmp_path / "raw")
    with pytest.raises(ValueError, match=rf"^{cut}: corrupt DICOM file \("):
        local.dicom_dir.list_studies({"path": str(root)})


def test_dicom_dir_through_the_dispatch(dicom_tree, tmp_path):
    root, _ = dicom_tree
    settings = {"path": str(root), "link": "symlink"}
    sources.write_manifest("dicom_dir", settings, SPLIT, tmp_path / "manifest.tsv")
    table = manifest.read(tmp_path / "manifest.tsv")
    assert list(table["study_id"]) == ["A_1", "A_2", "B_1"]
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    sources.fetch_study("dicom_dir", settings, tmp_path / "manifest.tsv", "B_1", tmp_path / "B_1")
    pet_folder = table.set_index("study_id").loc["B_1", "pet_series"]
    assert len(list((tmp_path / "B_1" / pet_folder).iterdir())) == 4


def test_missing_path_is_reported():
    with pytest.raises(ValueError, match=r"download.dicom_dir.path '' is not a directory"):
        local.dicom_dir.list_studies({"path": ""})


def write_release_study(folder: Path, seg: np.ndarray | None = None, shape=(4, 5, 6)) -> None:
    """A tiny autoPET release study; arrays (z, y, x), SUV/PET/CTres/SEG on one grid."""
    folder.mkdir(parents=True)
    affine = np.diag([-4.0, -4.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -30.0]
    rng = np.random.default_rng(0)
    seg = np.zeros(shape, np.uint8) if seg is None else seg
    arrays = {
        "CT": rng.normal(0, 100, (8, 10, 12)).astype(np.float32),
        "CTres": rng.normal(0, 100, shape).astype(np.float32),
        "PET": rng.random(shape).astype(np.float32),
        "SUV": rng.random(shape).astype(np.float32),
        "SEG": seg,
    }
    for name, array in arrays.items():
        nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), affine), folder / f"{name}.nii.gz")


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "FDG-PET-CT-Lesions"
    lesion = np.zeros((4, 5, 6), np.uint8)
    lesion[1:3, 2, 2] = 1
    write_release_study(root / "PETCT_0a" / "01-02-2004-NA-PET-CT Ganzkoerper-20445", lesion)
    write_release_study(root / "PETCT_0a" / "03-23-2003-NA-PET-CT Ganzkoerper-10445")
    write_release_study(root / "PETCT_0b" / "05-05-2005-NA-PET-CT-30445")
    return root


def test_nifti_dir_lists_release_studies_in_date_order(release):
    records = local.nifti_dir.list_studies({"path": str(release)})
    assert [(r["study_id"], r["has_lesions"]) for r in records] == [
        ("PETCT_0a_1", False),
        ("PETCT_0a_2", True),
        ("PETCT_0b_1", False),
    ]
    assert Path(records[0]["nifti_dir"]).name.startswith("03-23-2003")


def test_nifti_dir_fetch_and_link_make_symlinks_not_copies(release, tmp_path):
    row = local.nifti_dir.list_studies({"path": str(release)})[1]
    raw = tmp_path / "raw" / "PETCT_0a_2"
    local.nifti_dir.fetch_study({"path": str(release)}, row, raw)
    outputs = {n: tmp_path / "nifti" / "PETCT_0a_2" / f"{n}.nii.gz" for n in NIFTI_NAMES}
    local.link_nifti_study("PETCT_0a_2", raw, outputs)
    source = Path(row["nifti_dir"])
    for name, path in outputs.items():
        assert path.is_symlink()
        assert os.readlink(path) == str((source / f"{name}.nii.gz").resolve())
    seg = nib.load(outputs["SEG"]).get_fdata()
    assert seg.sum() == 2


def test_nifti_dir_refuses_seg_off_the_suv_grid(release, tmp_path):
    bad = release / "PETCT_0c" / "06-06-2006-NA-x-1"
    write_release_study(bad, np.zeros((4, 5, 7), np.uint8))
    row = next(
        r
        for r in local.nifti_dir.list_studies({"path": str(release)})
        if r["patient_id"] == "PETCT_0c"
    )
    with pytest.raises(
        StudyError, match=r"study PETCT_0c_1, file .*SEG\.nii\.gz: SEG shape \(4, 5, 7\)"
    ):
        local.nifti_dir.fetch_study({"path": str(release)}, row, tmp_path / "raw")


def test_nifti_dir_refuses_non_binary_seg(tmp_path):
    seg = np.zeros((4, 5, 6), np.uint8)
    seg[0, 0, 0] = 2
    write_release_study(tmp_path / "rel" / "P" / "01-01-2001-NA-x-1", seg)
    row = local.nifti_dir.list_studies({"path": str(tmp_path / "rel")})[0]
    with pytest.raises(
        StudyError, match=r"study P_1, .*SEG\.nii\.gz: SEG is not binary \(values \[0, 2\]\)"
    ):
        local.nifti_dir.fetch_study({}, row, tmp_path / "raw")


def test_nifti_dir_truncated_seg_is_named_when_listed(tmp_path):
    """It stopped the manifest job with a bare `EOFError: Compressed file ended...`."""
    rng = np.random.default_rng(1)
    seg = rng.integers(0, 2, (20, 30, 40), dtype=np.uint8)  # noise: a gzip stream of kilobytes
    folder = tmp_path / "rel" / "PETCT_0d" / "01-01-2001-NA-x-1"
    write_release_study(folder, seg, shape=seg.shape)
    path = folder / "SEG.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        StudyError,
        match=rf"^study PETCT_0d_1, file {path}: cannot read NIfTI \(Compressed file ended",
    ):
        sources.write_manifest("nifti_dir", {"path": str(tmp_path / "rel")}, SPLIT, tmp_path / "m")


def test_nifti_dir_duplicate_ids_name_their_folders(tmp_path):
    """Patient folders that differ only in characters unsafe in an id give one study id."""
    first = tmp_path / "rel" / "PETCT 0e" / "01-01-2001-NA-x-1"
    second = tmp_path / "rel" / "PETCT-0e" / "02-02-2002-NA-x-2"
    for folder in (first, second):
        write_release_study(folder)
    with pytest.raises(StudyError) as error:
        sources.write_manifest("nifti_dir", {"path": str(tmp_path / "rel")}, SPLIT, tmp_path / "m")
    assert str(error.value).startswith(
        f"study PETCT-0e_1, file {second}: two study folders get this id: {first} and {second}"
    )
    assert not (tmp_path / "m").exists()


def test_dicom_dir_of_the_synthetic_cohort_lists_like_the_synthetic_source(
    tmp_path, micro_synthetic_settings
):
    """Ids, patients, series folders and lesion status (from real DICOM SEG pixels) agree."""
    from stepseg.synthetic import source as synthetic

    settings = micro_synthetic_settings
    expected = synthetic.list_studies(settings)
    for row in expected:
        (tmp_path / row["study_id"]).mkdir()
        synthetic.fetch_study(settings, row, tmp_path / row["study_id"])
    records = local.dicom_dir.list_studies({"path": str(tmp_path)})
    columns = ["study_id", "patient_id", "has_lesions", "ct_series", "pet_series", "seg_series"]
    assert [{c: r[c] for c in columns} for r in records] == expected
    assert {r["has_lesions"] for r in records} == {True, False}


@pytest.mark.slow
def test_nifti_dir_workflow_links_instead_of_converting(release, tmp_path):
    """The real Snakefile: with `source: nifti_dir`, link_nifti (not convert) makes the NIfTI."""
    root = Path(__file__).resolve().parents[1]
    snakefile = root / "Snakefile"
    assert 'include: "workflow/rules/nifti_dir.smk"' in snakefile.read_text(), (
        "the Snakefile must include workflow/rules/nifti_dir.smk"
    )
    workdir = tmp_path / "run"
    shutil.copytree(root / "config", workdir / "config")
    # the release holds too few patients for the default config's folds; linking needs none
    (workdir / "nifti.yaml").write_text(
        f"download:\n  source: nifti_dir\n  nifti_dir:\n    path: {release}\ntrain:\n  folds: 1\n"
    )
    studies = ("PETCT_0a_2", "PETCT_0b_1")
    targets = [f"results/nifti/{s}/{n}.nii.gz" for s in studies for n in ("SUV", "SEG")]

    def snakemake(*args: str) -> str:
        command = [str(Path(sys.executable).parent / "snakemake"), "-s", str(snakefile)]
        done = subprocess.run(
            [*command, "-d", str(workdir), "--cores", "1", *targets, *args,
             "--configfile", str(workdir / "nifti.yaml")],
            capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done.stdout + done.stderr

    log = snakemake()
    assert "Rule: link_nifti" in log and "Rule: convert" not in log
    suv = workdir / "results" / "nifti" / "PETCT_0a_2" / "SUV.nii.gz"
    assert suv.is_symlink()
    study = release / "PETCT_0a" / "01-02-2004-NA-PET-CT Ganzkoerper-20445"
    assert suv.resolve() == (study / "SUV.nii.gz").resolve()
    assert "Nothing to be done" in snakemake("--dry-run")
