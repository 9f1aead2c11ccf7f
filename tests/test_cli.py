"""`stepseg predict`: .mha <-> Volume geometry, the grand-challenge layout, predictions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the conventional name)
import torch
import yaml

from stepseg import cli, infer, model, nifti, normalize, presets
from stepseg.settings import InferSettings, TrainSettings

# an oblique, anisotropic grid: rotation about z by 30 degrees, one axis flipped
ANGLE = np.deg2rad(30.0)
ROTATION = np.array(
    [[np.cos(ANGLE), -np.sin(ANGLE), 0.0], [np.sin(ANGLE), np.cos(ANGLE), 0.0], [0.0, 0.0, -1.0]]
)
AFFINE = np.eye(4)
AFFINE[:3, :3] = ROTATION @ np.diag([2.04, 2.5, 3.0])
AFFINE[:3, 3] = [-401.3, 250.25, -1203.5]
PATCH = [8, 16, 16]
pytestmark = pytest.mark.usefixtures("restore_logging")


def volume(shape=(5, 6, 7), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return nifti.Volume(rng.normal(0, 10, shape).astype(dtype), AFFINE.copy())


def test_mha_round_trip_keeps_array_and_affine(tmp_path):
    original = volume()
    cli.write_image(original, tmp_path / "x.mha")
    back = nifti.to_stored(cli.read_image(tmp_path / "x.mha", "s"))
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-9)
    assert back.array.shape == (5, 6, 7)  # (z, y, x), as everywhere in stepseg


def test_itk_geometry_is_lps_and_matches_simpleitk_reading_the_nifti(tmp_path):
    """SimpleITK's own NIfTI reader is the independent reference for the LPS/RAS convention."""
    original = volume()
    nifti.save(original, tmp_path / "x.nii.gz")
    reference = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    ours = cli.volume_to_itk(original)
    np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert ours.GetOrigin()[:2] == pytest.approx((401.3, -250.25))  # RAS x, y negated
    back = cli.volume_from_itk(reference)
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-4)


def test_voxel_centre_lands_on_the_same_world_point(tmp_path):
    image = cli.volume_to_itk(volume())
    index_xyz = (3, 1, 4)
    lps = np.array(image.TransformIndexToPhysicalPoint(index_xyz))
    ras = AFFINE @ np.array([*index_xyz, 1.0])
    np.testing.assert_allclose(lps, ras[:3] * [-1, -1, 1], atol=1e-9)


def test_sheared_affine_is_refused():
    sheared = AFFINE.copy()
    sheared[0, 1] += 1.0
    with pytest.raises(ValueError, match="sheared"):
        cli.volume_to_itk(nifti.Volume(np.zeros((2, 2, 2), np.float32), sheared))


def write_gc_inputs(root, names_pet, names_ct):
    for folder, names in (("pet", names_pet), ("ct", names_ct)):
        (root / "images" / folder).mkdir(parents=True)
        for name in names:
            cli.write_image(volume(), root / "images" / folder / name)


def test_grand_challenge_pairs_by_name_or_single_images(tmp_path):
    write_gc_inputs(tmp_path / "a", ["u1.mha", "u2.mha"], ["u1.mha", "u2.mha"])
    pairs = cli.grand_challenge_pairs(tmp_path / "a", tmp_path / "out")
    out = tmp_path / "out" / "images" / "automated-petct-lesion-segmentation"
    assert [(p.name, c.name, o) for p, c, o in pairs] == [
        ("u1.mha", "u1.mha", out / "u1.mha"),
        ("u2.mha", "u2.mha", out / "u2.mha"),
    ]
    write_gc_inputs(tmp_path / "b", ["pet-uuid.mha"], ["ct-uuid.mha"])
    ((pet, ct, target),) = cli.grand_challenge_pairs(tmp_path / "b", tmp_path / "out")
    assert (pet.parent.name, ct.parent.name, target.name) == ("pet", "ct", "ct-uuid.mha")
    write_gc_inputs(tmp_path / "c", ["a.mha", "b.mha"], ["c.mha", "d.mha"])
    with pytest.raises(ValueError, match="cannot pair 2 PET and 2 CT images"):
        cli.grand_challenge_pairs(tmp_path / "c", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"found 0 and 0"):
        cli.grand_challenge_pairs(tmp_path / "empty", tmp_path / "out")


def save_random_model(path: Path, mask_prior: float | None = None) -> Path:
    """A tiny network (one PATCH-sized window) with random weights far from their
    initialisation, saved as a model.pt; `mask_prior` sets the mask channel's prior."""
    settings = TrainSettings.for_variant(
        {"channels": [4, 8], "num_res_units": 1, "norm": "instance", "patch_size": PATCH}
    )
    info = model.ModelInfo(
        settings=settings,
        network=model.network_spec(settings, out_channels=8),
        target_preset=presets.PAPER.to_dict(),
    )
    torch.manual_seed(0)
    net = model.build(info.network)
    with torch.no_grad():  # a bias so that the mask is neither empty nor full
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if mask_prior is not None:
        model.init_mask_prior(net, mask_prior)
    model.save(path, net, info)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("model") / "model.pt")


def network_mask(model_path, suv: nifti.Volume, ct: nifti.Volume) -> tuple[np.ndarray, np.ndarray]:
    """The mask straight from the network on the normalised volume in stepseg's orientation,
    without stepseg.infer, flipped back to the volume's own: the volume is exactly one patch, so
    one window sees it all. Also returns the voxels too close to the 0.5 threshold for float
    rounding to decide."""
    assert list(suv.array.shape) == PATCH
    net, _ = model.load(model_path, torch.device("cpu"))
    canonical = [nifti.reorient(v) for v in (suv, ct)]
    inputs = normalize.normalize_batch(*(torch.from_numpy(v.array)[None, None] for v in canonical))
    with torch.no_grad():
        probability = torch.sigmoid(net(inputs)[0, 0]).numpy()
    back = nifti.to_stored(nifti.Volume(probability, canonical[0].affine, suv.affine)).array
    return (back >= 0.5).astype(np.uint8), np.abs(back - 0.5) < 1e-5


def assert_mask_equals_the_network(mask, expected, undecided):
    assert mask.shape == expected.shape
    np.testing.assert_array_equal(mask[~undecided], expected[~undecided])
    assert 0 < expected.sum() < expected.size
    assert undecided.sum() <= 2


def test_predict_grand_challenge_layout(tmp_path, model_path):
    rng = np.random.default_rng(1)
    shape = tuple(PATCH)
    suv = nifti.Volume(rng.gamma(2.0, 1.0, shape).astype(np.float32), AFFINE.copy())
    ct = nifti.Volume(rng.normal(0, 300, shape).astype(np.float32), AFFINE.copy())
    (tmp_path / "in" / "images" / "pet").mkdir(parents=True)
    (tmp_path / "in" / "images" / "ct").mkdir(parents=True)
    cli.write_image(suv, tmp_path / "in" / "images" / "pet" / "1f2e.mha")
    cli.write_image(ct, tmp_path / "in" / "images" / "ct" / "9a8b.mha")
    # float32, as the reference: bf16 (amp auto on some CPUs) moves voxels near the threshold
    args = ["predict", "--model", str(model_path), "--device", "cpu", "--amp", "off"]
    dirs = ["--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]
    assert cli.main(args + dirs) == 0
    out = tmp_path / "out" / "images" / "automated-petct-lesion-segmentation" / "9a8b.mha"
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkUInt8
    written = cli.volume_from_itk(image)
    np.testing.assert_allclose(written.affine, suv.affine, atol=1e-9)
    assert_mask_equals_the_network(written.array, *network_mask(model_path, suv, ct))


def test_predict_single_nifti_study_via_the_console_script(tmp_path, model_path):
    rng = np.random.default_rng(2)
    shape = tuple(PATCH)
    suv = rng.gamma(2.0, 1.0, shape).astype(np.float32)
    ct = rng.normal(0, 300, shape).astype(np.float32)
    nifti.save(nifti.Volume(suv, AFFINE), tmp_path / "SUV.nii.gz")
    nifti.save(nifti.Volume(ct, AFFINE), tmp_path / "CTres.nii.gz")
    script = Path(sys.executable).parent / "stepseg"  # the console script pyproject declares
    command = [str(script), "predict", "--model", str(model_path)]
    files = ["--suv", str(tmp_path / "SUV.nii.gz"), "--ctres", str(tmp_path / "CTres.nii.gz")]
    done = subprocess.run(
        command
        + files
        + ["--out", str(tmp_path / "pred.nii.gz"), "--device", "cpu", "--amp", "off"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert done.stdout.startswith(f"{tmp_path / 'pred.nii.gz'}\t")
    mask = nifti.to_stored(nifti.load(tmp_path / "pred.nii.gz", "s"))  # as the file stores it
    assert mask.array.dtype == np.uint8
    np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-5)
    assert_mask_equals_the_network(
        mask.array, *network_mask(model_path, nifti.Volume(suv, AFFINE), nifti.Volume(ct, AFFINE))
    )


def test_gate_threshold_keeps_or_drops_components_by_their_windows_presence(tmp_path, model_path):
    """One window sees the whole volume, so every component's presence is that window's factor
    of channel 7 on the normalised CT: a gate just below it keeps the network's mask, just
    above it drops every component."""
    rng = np.random.default_rng(2)
    suv = nifti.Volume(rng.gamma(2.0, 1.0, tuple(PATCH)).astype(np.float32), AFFINE)
    ct = nifti.Volume(rng.normal(0, 300, tuple(PATCH)).astype(np.float32), AFFINE)
    nifti.save(suv, tmp_path / "SUV.nii.gz")
    nifti.save(ct, tmp_path / "CTres.nii.gz")
    net, _ = model.load(model_path, torch.device("cpu"))
    canonical = [nifti.reorient(v) for v in (suv, ct)]
    inputs = normalize.normalize_batch(*(torch.from_numpy(v.array)[None, None] for v in canonical))
    with torch.no_grad():
        whole = net(inputs)[:, 7:8]
    presence = float((whole * inputs[:, 1:]).sum() / inputs[:, 1:].square().sum())
    files = ["--suv", str(tmp_path / "SUV.nii.gz"), "--ctres", str(tmp_path / "CTres.nii.gz")]
    masks = {}
    for name, threshold in (("below", presence - 0.01), ("above", presence + 0.01)):
        out = tmp_path / f"{name}.nii.gz"
        args = ["predict", "--model", str(model_path), *files, "--out", str(out)]
        gate = ["--gate-threshold", str(threshold), "--device", "cpu", "--amp", "off"]
        assert cli.main(args + gate) == 0
        masks[name] = nifti.to_stored(nifti.load(out, "s")).array
    assert_mask_equals_the_network(masks["below"], *network_mask(model_path, suv, ct))
    assert masks["above"].sum() == 0
    assert not list(tmp_path.glob("*.presence.*"))  # the command writes masks only


def test_grid_mismatch_is_reported_with_the_study(tmp_path, model_path, capsys):
    cli.write_image(volume((4, 5, 6)), tmp_path / "SUV.mha")
    cli.write_image(volume((4, 5, 7)), tmp_path / "CTres.mha")
    code = cli.main(
        ["predict", "--model", str(model_path), "--suv", str(tmp_path / "SUV.mha"),
         "--ctres", str(tmp_path / "CTres.mha"), "--out", str(tmp_path / "p.mha")]
    )  # fmt: skip
    assert code == 1
    assert "study SUV, file" in capsys.readouterr().err
    assert not (tmp_path / "p.mha").exists()


def test_nan_in_the_suv_is_refused_before_inference(tmp_path, model_path, capsys):
    """It used to exit 0 with a mask that had lost half of the true lesion voxels."""
    rng = np.random.default_rng(3)
    suv = nifti.Volume(rng.gamma(2.0, 1.0, (10, 18, 17)).astype(np.float32), AFFINE.copy())
    suv.array[2:4, 5:8, 5:8] = np.nan
    ct = nifti.Volume(rng.normal(0, 300, (10, 18, 17)).astype(np.float32), AFFINE.copy())
    cli.write_image(suv, tmp_path / "PETCT_9.mha")
    cli.write_image(ct, tmp_path / "CTres.mha")
    code = cli.main(
        ["predict", "--model", str(model_path), "--suv", str(tmp_path / "PETCT_9.mha"),
         "--ctres", str(tmp_path / "CTres.mha"), "--out", str(tmp_path / "p.nii.gz")]
    )  # fmt: skip
    assert code == 1
    assert (
        f"stepseg predict: study PETCT_9, file {tmp_path / 'PETCT_9.mha'}: "
        "SUV has 18 NaN and 0 infinite voxels"
    ) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CTres.mha", "PETCT_9.mha"]


def outside_a_circle(shape: tuple[int, int, int]) -> np.ndarray:
    """The voxels of every slice outside the circle inscribed in it, as a CT's padding."""
    _, ny, nx = shape
    y, x = np.ogrid[:ny, :nx]
    radius = min(ny, nx) / 2
    outside = (y - (ny - 1) / 2) ** 2 + (x - (nx - 1) / 2) ** 2 > radius**2
    return np.broadcast_to(outside, shape)


@pytest.mark.parametrize("padding", [-3024.0, -2048.0])
def test_scanner_padding_predicts_as_air(tmp_path, model_path, padding):
    rng = np.random.default_rng(6)
    suv = rng.gamma(2.0, 1.0, PATCH).astype(np.float32)
    ct = rng.normal(0, 300, PATCH).astype(np.float32)
    ring = outside_a_circle(tuple(PATCH))
    nifti.save(nifti.Volume(suv, AFFINE), tmp_path / "SUV.nii.gz")
    masks = {}
    for fill in (-1024.0, padding):
        ctres, out = tmp_path / f"CTres{fill}.nii.gz", tmp_path / f"pred{fill}.nii.gz"
        nifti.save(nifti.Volume(np.where(ring, fill, ct), AFFINE), ctres)
        code = cli.main(
            ["predict", "--model", str(model_path), "--suv", str(tmp_path / "SUV.nii.gz"),
             "--ctres", str(ctres), "--out", str(out), "--device", "cpu", "--amp", "off"]
        )  # fmt: skip
        assert code == 0
        masks[fill] = nifti.to_stored(nifti.load(out, "s")).array  # as the file stores it
    np.testing.assert_array_equal(masks[padding], masks[-1024.0])
    air = nifti.Volume(np.where(ring, -1024.0, ct).astype(np.float32), AFFINE)
    expected = network_mask(model_path, nifti.Volume(suv, AFFINE), air)
    assert_mask_equals_the_network(masks[padding], *expected)
    assert masks[padding][ring].any()  # the padded voxels are predicted, not skipped


def test_values_below_any_ct_are_refused_beside_padding(tmp_path, model_path, capsys):
    ct = np.where(outside_a_circle(tuple(PATCH)), -3024.0, 40.0).astype(np.float32)
    ct[3, 8, 8] = -5000.0
    nifti.save(nifti.Volume(np.ones(PATCH, np.float32), AFFINE), tmp_path / "PETCT_7.nii.gz")
    nifti.save(nifti.Volume(ct, AFFINE), tmp_path / "CTres.nii.gz")
    code = cli.main(
        ["predict", "--model", str(model_path), "--suv", str(tmp_path / "PETCT_7.nii.gz"),
         "--ctres", str(tmp_path / "CTres.nii.gz"), "--out", str(tmp_path / "p.nii.gz")]
    )  # fmt: skip
    assert code == 1
    assert (
        f"study PETCT_7, file {tmp_path / 'CTres.nii.gz'}: CTres has 1 voxels outside the "
        "plausible range [-1100, 4000] HU (min -5000, max 40)"
    ) in capsys.readouterr().err
    assert not (tmp_path / "p.nii.gz").exists()


def _single_study(folder: Path) -> list[str]:
    """Arguments of a plausible single-study prediction in `folder` (output not included)."""
    rng = np.random.default_rng(4)
    suv = nifti.Volume(rng.gamma(2.0, 1.0, (8, 16, 16)).astype(np.float32), AFFINE.copy())
    ct = nifti.Volume(rng.normal(0, 200, (8, 16, 16)).astype(np.float32), AFFINE.copy())
    nifti.save(suv, folder / "PETCT_5.nii.gz")
    nifti.save(ct, folder / "CTres.nii.gz")
    return ["--suv", str(folder / "PETCT_5.nii.gz"), "--ctres", str(folder / "CTres.nii.gz")]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("pred.nii.gz", "pred.nii.gz exists; pass --force to overwrite it"),
        ("pred.png", "pred.png: unknown image extension; expected .nii.gz, .nii, .mha, .nrrd"),
        ("pred.mhd", "pred.mhd: unknown image extension"),
    ],
)
def test_output_is_checked_before_the_model_is_even_read(tmp_path, capsys, name, message):
    out = tmp_path / name
    out.write_bytes(b"an earlier result")
    code = cli.main(
        ["predict", "--model", str(tmp_path / "missing.pt"), *_single_study(tmp_path),
         "--out", str(out)]
    )  # fmt: skip
    assert code == 1
    assert f"ERROR stepseg.cli: stepseg predict: output {tmp_path / message}" in (
        capsys.readouterr().err
    )
    assert out.read_bytes() == b"an earlier result"


def test_full_disk_is_reported_with_the_output_path(tmp_path, model_path, full_disk, capsys):
    """It said `stepseg predict: [Errno 28] No space left on device`, naming no file."""
    out = full_disk / "pred.nii.gz"
    code = cli.main(
        ["predict", "--model", str(model_path), *_single_study(tmp_path), "--out", str(out),
         "--device", "cpu", "--amp", "off"]
    )  # fmt: skip
    assert code == 1
    assert (
        f"ERROR stepseg.cli: stepseg predict: [Errno 28] No space left on device while writing "
        f"{out}: the disk or quota may be full"
    ) in capsys.readouterr().err
    assert [p.name for p in full_disk.iterdir()] == ["filler"]


def test_force_overwrites_and_log_appends(tmp_path, model_path):
    out, log_path = tmp_path / "pred.nii.gz", tmp_path / "predict.log"
    out.write_bytes(b"an earlier result")
    log_path.write_text("an earlier line\n")
    args = ["predict", "--model", str(model_path), *_single_study(tmp_path), "--out", str(out)]
    assert cli.main([*args, "--force", "--log", str(log_path), "--device", "cpu"]) == 0
    assert nifti.load(out, "s").array.dtype == np.uint8
    lines = log_path.read_text().splitlines()
    assert lines[0] == "an earlier line"
    assert lines[1].endswith(
        f"INFO stepseg.cli: study PETCT_5: {tmp_path / 'PETCT_5.nii.gz'} + "
        f"{tmp_path / 'CTres.nii.gz'} -> {out}"
    )


def test_an_unexpected_error_is_logged_with_type_study_and_traceback(
    tmp_path, model_path, monkeypatch
):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory in the sliding window")

    monkeypatch.setattr(infer, "predict", fail)
    log_path = tmp_path / "predict.log"
    args = ["predict", "--model", str(model_path), *_single_study(tmp_path)]
    assert cli.main([*args, "--out", str(tmp_path / "p.mha"), "--log", str(log_path)]) == 1
    text = log_path.read_text()
    assert (
        f"ERROR stepseg.cli: stepseg predict failed on study PETCT_5, file "
        f"{tmp_path / 'PETCT_5.nii.gz'}: RuntimeError: out of memory in the sliding window\n"
        "Traceback (most recent call last):"
    ) in text
    assert not (tmp_path / "p.mha").exists()


def test_several_studies_share_one_model_load(tmp_path, model_path, monkeypatch, capsys):
    loads = []
    real_load = model.load

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model, "load", counting_load)
    rng = np.random.default_rng(5)
    for name in ("u1.mha", "u2.mha"):
        for folder, image in (
            ("pet", rng.gamma(2.0, 1.0, PATCH)),
            ("ct", rng.normal(0, 200, PATCH)),
        ):
            path = tmp_path / "in" / "images" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            cli.write_image(nifti.Volume(image.astype(np.float32), AFFINE.copy()), path)
    args = ["predict", "--model", str(model_path), "--device", "cpu", "--amp", "off"]
    dirs = ["--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]
    assert cli.main(args + dirs) == 0
    assert loads == [model_path]
    out = tmp_path / "out" / "images" / "automated-petct-lesion-segmentation"
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed] == [str(out / "u1.mha"), str(out / "u2.mha")]


def test_predict_defaults_are_the_infer_rules():
    """Without options `stepseg predict` predicts as the infer rule of the shipped config: one
    value per setting, InferSettings' default (it once used 2 windows a pass, the rule 4)."""
    parser = cli.build_parser()
    default = cli.infer_settings(parser.parse_args(["predict", "--model", "m.pt"]))
    config = yaml.safe_load((Path(__file__).parents[1] / "config/config.yaml").read_text())
    assert default == InferSettings() == InferSettings.from_mapping(config["infer"])
    assert set(cli.PREDICT_OPTIONS) <= set(InferSettings().to_dict())
    chosen = cli.infer_settings(parser.parse_args(
        ["predict", "--model", "m.pt", "--overlap", "0.25", "--flip-tta", "--sw-batch-size", "3",
         "--threshold", "0.4", "--amp", "off"]
    ))  # fmt: skip
    assert chosen == InferSettings(
        overlap=0.25, flip_tta=True, sw_batch_size=3, threshold=0.4, amp="off"
    )
