import dataclasses
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from stepseg import infer, model, nifti, normalize, presets
from stepseg.errors import StudyError
from stepseg.settings import InferSettings, TrainSettings

PATCH = [8, 16, 16]
CFG = {"channels": [4, 8], "num_res_units": 1, "norm": "instance", "patch_size": PATCH}
FP32 = InferSettings(amp="off")  # exact comparisons with the float32 network


def _info(zero_channel=False, targets="stepwise") -> model.ModelInfo:
    settings = TrainSettings.for_variant(
        {**CFG, "zero_input_channel": zero_channel, "targets": targets}
    )
    return model.ModelInfo(
        settings=settings,
        network=model.network_spec(settings, out_channels=8),
        target_preset=presets.PAPER.to_dict(),
    )


AFFINE = np.array([[-4.0, 0, 0, 10.0], [0, -4.0, 0, 20.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])


def _checkpoint(path, zero_channel=False, seed=0):
    info = _info(zero_channel)
    torch.manual_seed(seed)
    net = model.build(info.network)
    with torch.no_grad():  # a bias so the mask is neither empty nor full
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save(path, net, info)
    return net.eval()


def _volumes(shape, seed=0):
    rng = np.random.default_rng(seed)
    suv = rng.gamma(2.0, 1.0, shape).astype(np.float32)
    ct = rng.normal(0, 300, shape).astype(np.float32)
    return nifti.Volume(suv, AFFINE), nifti.Volume(ct, AFFINE)


def _manual_probability(net, suv, ct, flips=((),)):
    x = normalize.normalize_batch(
        torch.from_numpy(suv)[None, None], torch.from_numpy(ct)[None, None]
    )
    total = 0
    with torch.no_grad():
        for dims in flips:
            xi = x.flip(dims) if dims else x
            p = torch.sigmoid(net(xi)[:, :1])
            total = total + (p.flip(dims) if dims else p)
    return (total / len(flips))[0, 0].numpy()


def test_single_window_equals_the_network_on_the_normalised_volume(tmp_path):
    path = tmp_path / "model.pt"
    net = _checkpoint(path)
    suv, ct = _volumes(tuple(PATCH))
    loaded, checkpoint = model.load(path, torch.device("cpu"))
    prob = infer.predict_probability(
        loaded, checkpoint, suv.array, ct.array, FP32, torch.device("cpu")
    )[0]
    np.testing.assert_allclose(prob, _manual_probability(net, suv.array, ct.array), atol=1e-5)
    mask = infer.predict_volume(path, suv, ct, FP32)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))
    assert 0 < mask.sum() < mask.size


def test_flip_tta_averages_the_flipped_predictions(tmp_path):
    path = tmp_path / "model.pt"
    net = _checkpoint(path)
    suv, ct = _volumes(tuple(PATCH), seed=1)
    loaded, checkpoint = model.load(path, torch.device("cpu"))
    prob = infer.predict_probability(
        loaded,
        checkpoint,
        suv.array,
        ct.array,
        dataclasses.replace(FP32, flip_tta=True),
        torch.device("cpu"),
    )[0]
    expected = _manual_probability(net, suv.array, ct.array, flips=((), (2,), (3,), (4,)))
    np.testing.assert_allclose(prob, expected, atol=1e-5)


def test_windows_are_normalised_one_by_one(tmp_path):
    """Two halves with very different SUV scale: per-window z-scores make them look alike."""
    path = tmp_path / "model.pt"
    _checkpoint(path)
    suv, ct = _volumes((8, 16, 32))
    loaded, checkpoint = model.load(path, torch.device("cpu"))
    seen = []
    forward = loaded.forward
    loaded.forward = lambda x: (seen.append(x.clone()), forward(x))[1]
    scaled = suv.array + 0.2  # every voxel is PET foreground (SUV > 0.14)
    scaled[..., 16:] *= 50.0
    infer.predict_probability(
        loaded,
        checkpoint,
        scaled,
        ct.array,
        dataclasses.replace(FP32, overlap=0.0),
        torch.device("cpu"),
    )[0]
    windows = torch.cat(seen)
    assert windows.shape[0] == 2
    for w in windows:  # each window's PET z-scored on its own: mean 1, std 1/2
        assert float(w[0].mean()) == pytest.approx(1.0, abs=1e-4)
        assert float(w[0].std(unbiased=False)) == pytest.approx(0.5, abs=1e-4)


@pytest.mark.skipif(not model.cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_inference_on_the_cpu_follows_float32(tmp_path):
    """bf16 autocast (amp auto on such a CPU) keeps 8 bits of mantissa: the probabilities of a
    multi-window volume stay within 0.03 of float32 and the masks differ in under 1 % of voxels."""
    path = tmp_path / "model.pt"
    _checkpoint(path)
    suv, ct = _volumes((20, 40, 36))
    net, checkpoint = model.load(path, torch.device("cpu"))
    assert model.autocast_dtype(torch.device("cpu"), "auto") == torch.bfloat16
    prob = {
        amp: infer.predict_probability(
            net,
            checkpoint,
            suv.array,
            ct.array,
            dataclasses.replace(FP32, amp=amp),
            torch.device("cpu"),
        )[0]
        for amp in ("off", "auto")
    }
    np.testing.assert_allclose(prob["auto"], prob["off"], atol=3e-2)
    assert np.abs(prob["auto"] - prob["off"]).mean() < 5e-3
    assert np.mean((prob["auto"] >= 0.5) != (prob["off"] >= 0.5)) < 0.01


def test_amp_settings_a_cpu_cannot_run_are_refused():
    cpu = torch.device("cpu")
    assert model.autocast_dtype(cpu, "off") is None
    with pytest.raises(ValueError, match="amp fp16 needs a CUDA device"):
        model.autocast_dtype(cpu, "fp16")
    with pytest.raises(ValueError, match="amp 'half' is not one of"):
        model.autocast_dtype(cpu, "half")


def test_volume_smaller_than_the_patch_is_padded_not_a_crash(tmp_path):
    path = tmp_path / "model.pt"
    _checkpoint(path, zero_channel=True)
    suv, ct = _volumes((5, 11, 30))
    mask = infer.predict_volume(path, suv, ct, InferSettings(overlap=0.5))
    assert mask.shape == (5, 11, 30)
    assert mask.dtype == np.uint8


def test_predict_split_writes_every_study_on_its_suv_grid(tmp_path):
    path = tmp_path / "model.pt"
    _checkpoint(path)
    shapes = {"S1": (10, 20, 18), "S2": (12, 16, 20)}
    for study, shape in shapes.items():
        suv, ct = _volumes(shape)
        nifti.save(suv, tmp_path / study / "SUV.nii.gz")
        nifti.save(ct, tmp_path / study / "CTres.nii.gz")
    out = tmp_path / "pred" / "test"
    infer.predict_split(
        model_paths=[path],
        studies=list(shapes),
        suv_paths=[tmp_path / s / "SUV.nii.gz" for s in shapes],
        ctres_paths=[tmp_path / s / "CTres.nii.gz" for s in shapes],
        out_dir=out,
        settings=InferSettings(),
        threads=1,
    )
    # beside each mask its components' lesion presence (a stepwise model: stepseg.gate)
    assert sorted(p.name for p in out.iterdir()) == [
        "S1.nii.gz", "S1.presence.nii.gz", "S2.nii.gz", "S2.presence.nii.gz"
    ]  # fmt: skip
    for study, (z, y, x) in shapes.items():
        image = nib.load(out / f"{study}.nii.gz")
        assert image.shape == (x, y, z)
        assert image.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, AFFINE)
        assert set(np.unique(np.asarray(image.dataobj))) <= {0, 1}
    with pytest.raises(ValueError, match="2 studies but 1 SUV and 2 CTres files"):
        infer.predict_split(
            model_paths=[path],
            studies=list(shapes),
            suv_paths=[tmp_path / "S1.nii.gz"],
            ctres_paths=[1, 2],
            out_dir=out,
            settings=InferSettings(),
            threads=1,
        )


def test_a_fold_ensemble_thresholds_the_mean_probability_of_its_models(tmp_path):
    """Two models (seeds 0 and 1) on one volume: the written mask is mean(p0, p1) >= 0.5 with
    each model's probability from the same sliding window; it is neither model's own mask nor
    their voxelwise AND or OR (a vote over masks); one model alone gives its own mask."""
    paths = [tmp_path / "fold0" / "model.pt", tmp_path / "fold1" / "model.pt"]
    for seed, path in enumerate(paths):
        path.parent.mkdir()
        _checkpoint(path, seed=seed)
    suv, ct = _volumes((12, 24, 20))
    np.clip(ct.array, -1000, 1000, out=ct.array)  # plausible CT (checks) at this many voxels
    nifti.save(suv, tmp_path / "SUV.nii.gz")
    nifti.save(ct, tmp_path / "CTres.nii.gz")
    dev = torch.device("cpu")
    own = [
        infer.predict_probability(*model.load(path, dev), suv.array, ct.array, FP32, dev)[0]
        for path in paths
    ]
    expected = ((own[0] + own[1]) / 2 >= 0.5).astype(np.uint8)
    masks = [(p >= 0.5).astype(np.uint8) for p in own]

    def written(model_paths, name):
        files = infer.StudyFiles("S1", tmp_path / "SUV.nii.gz", tmp_path / "CTres.nii.gz",
                                 tmp_path / f"{name}.nii.gz")  # fmt: skip
        (voxels,) = infer.predict_studies(model_paths, [files], FP32, device="cpu")
        mask = nifti.load(files.out, "S1").array
        assert voxels == mask.sum()
        return mask

    ensemble = written(paths, "ensemble")
    np.testing.assert_array_equal(ensemble, expected)
    assert 0 < expected.sum() < expected.size
    for other in (*masks, masks[0] & masks[1], masks[0] | masks[1]):
        assert (ensemble != other).sum() > 0
    np.testing.assert_array_equal(written(paths[:1], "alone"), masks[0])


def _bad_study(folder, volume, value):
    """SUV and CTres files of study S1 with a 2x2x2 block of `value` in `volume`."""
    suv, ct = _volumes((10, 20, 18))
    (suv if volume == "SUV" else ct).array[4:6, 8:10, 8:10] = value
    nifti.save(suv, folder / "S1" / "SUV.nii.gz")
    nifti.save(ct, folder / "S1" / "CTres.nii.gz")
    return folder / "S1" / "SUV.nii.gz", folder / "S1" / "CTres.nii.gz"


@pytest.mark.parametrize(
    ("volume", "value", "message"),
    [
        ("SUV", np.nan, "SUV has 8 NaN and 0 infinite voxels"),
        ("CTres", np.inf, "CTres has 0 NaN and 8 infinite voxels"),
        ("CTres", 5000.0, r"CTres has 8 voxels outside the plausible range \[-1100, 4000\] HU"),
    ],
)
def test_predict_split_refuses_bad_inputs_before_loading_the_model(
    tmp_path, volume, value, message
):
    """A block of NaN used to erase true lesions in every sliding window that touched it."""
    suv_path, ctres_path = _bad_study(tmp_path, volume, value)
    out = tmp_path / "pred"
    bad = re.escape(str(tmp_path / "S1" / f"{volume}.nii.gz"))
    with pytest.raises(StudyError, match=f"study S1, file {bad}: {message}"):
        infer.predict_split(
            model_paths=[tmp_path / "no-model.pt"],
            studies=["S1"],
            suv_paths=[suv_path],
            ctres_paths=[ctres_path],
            out_dir=out,
            settings=InferSettings(),
            threads=1,
        )
    assert not out.exists()


def test_a_wider_configured_ct_range_lets_the_study_through(tmp_path):
    suv_path, ctres_path = _bad_study(tmp_path, "CTres", 5000.0)
    with pytest.raises(FileNotFoundError, match=r"no-model\.pt does not exist"):
        infer.predict_split(
            model_paths=[tmp_path / "no-model.pt"],
            studies=["S1"],
            suv_paths=[suv_path],
            ctres_paths=[ctres_path],
            out_dir=tmp_path / "p",
            settings=InferSettings(),
            threads=1,
            ct_hu_range=(-1100.0, 5000.0),
        )


def test_checkpoint_from_another_config_names_the_file(tmp_path):
    path = tmp_path / "model.pt"
    _checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["network"]["channels"] = [4, 16]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"model.pt: weights do not fit .* another config"):
        model.load(path, torch.device("cpu"))


def test_foreign_file_is_refused_by_name(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"other.pt is not a stepseg-model-2 model file"):
        model.load(path, torch.device("cpu"))
    # a model.pt of the first format (settings as a loose dict, no typed settings) is named
    torch.save({"format": "stepseg-model-1", "state_dict": {}, "network": {}}, path)
    with pytest.raises(ValueError, match=r"missing keys \['settings', 'target_preset'\], format "
                       r"'stepseg-model-1'"):  # fmt: skip
        model.load(path, torch.device("cpu"))
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"other.pt is not a readable stepseg model file"):
        model.load(path, torch.device("cpu"))


@pytest.mark.cuda
def test_cuda_inference_matches_the_cpu(tmp_path):
    path = tmp_path / "model.pt"
    _checkpoint(path)
    suv, ct = _volumes((20, 40, 36))
    probability = {}
    for device, amp in [("cpu", "off"), ("cuda", "off"), ("cuda", "auto")]:
        net, checkpoint = model.load(path, torch.device(device))
        settings = InferSettings(amp=amp)
        probability[device, amp] = infer.predict_probability(
            net, checkpoint, suv.array, ct.array, settings, torch.device(device)
        )[0]
    reference = probability["cpu", "off"]
    # float32 on the GPU (TF32 convolutions allowed): the same probabilities to about 1e-3
    np.testing.assert_allclose(probability["cuda", "off"], reference, atol=2e-3)
    # autocast (bf16 where supported): a few hundredths at most
    np.testing.assert_allclose(probability["cuda", "auto"], reference, atol=5e-2)
    assert probability["cuda", "auto"].dtype == np.float32


class CopyPet(torch.nn.Module):
    """Logits whose sigmoid is the PET input (in (0, 1)): the probability map is the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x[:, :1].clamp(1e-6, 1 - 1e-6))


class WindowRamp(torch.nn.Module):
    """A probability that depends on the position inside the window only (0.1 at the first column
    to 0.9 at the last): overlapping windows disagree, so the blend shows their weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0.1, 0.9, x.shape[-1], dtype=torch.float32)
        return torch.logit(ramp).expand(x.shape[0], 1, *x.shape[2:]).clone()


def _identity_normalisation(monkeypatch):
    """Windows reach the network as they are cut: [SUV, HU] unchanged."""
    monkeypatch.setattr(normalize, "normalize_batch", lambda suv, hu: torch.cat([suv, hu], 1))


@pytest.mark.parametrize(
    ("shape", "overlap", "flip_tta"),
    [
        ((5, 37, 23), 0.5, False),  # z padded (1 before, 2 after); 4 x 2 overlapping windows
        ((8, 13, 37), 0.25, True),  # y padded (1 before, 2 after); x: the last window shifted back
        ((19, 9, 16), 0.0, False),  # z: 3 windows, the last one shifted back; y padded 3 / 4
        ((3, 5, 7), 0.5, False),  # smaller than the patch on every axis: padding only
    ],
)
def test_stitched_volume_is_the_input_everywhere(monkeypatch, shape, overlap, flip_tta):
    """A network that copies its PET input: every voxel of the stitched, cropped output is that
    voxel's input, edges and padded axes included (a crop or window off by one voxel fails)."""
    _identity_normalisation(monkeypatch)
    rng = np.random.default_rng(3)
    suv = rng.uniform(0.05, 0.95, shape).astype(np.float32)
    ct = rng.normal(0, 300, shape).astype(np.float32)
    settings = InferSettings(overlap=overlap, flip_tta=flip_tta, sw_batch_size=3)
    prob = infer.predict_probability(
        CopyPet(), _info(targets="plain"), suv, ct, settings, torch.device("cpu")
    )[0]
    assert prob.shape == shape
    assert prob.dtype == np.float32
    np.testing.assert_allclose(prob, suv, atol=1e-5)


def test_overlapping_windows_are_blended_with_gaussian_weights(monkeypatch):
    """x = 40 voxels, window 16, overlap 0.5: windows start at x = 0, 8, 16 and 24 (one window in
    z and y). Each voxel is the gaussian-weighted mean of what the windows covering it say."""
    from monai.data.utils import compute_importance_map

    _identity_normalisation(monkeypatch)
    shape = (8, 16, 40)
    suv = np.full(shape, 0.5, np.float32)
    ct = np.zeros(shape, np.float32)
    settings = InferSettings(overlap=0.5)
    prob = infer.predict_probability(
        WindowRamp(), _info(targets="plain"), suv, ct, settings, torch.device("cpu")
    )[0]

    # MONAI's gaussian window weights (z, y, x), floored at their smallest positive value
    weight = compute_importance_map(PATCH, mode="gaussian", sigma_scale=0.125).numpy()
    ramp = np.linspace(0.1, 0.9, 16)

    def blend(weights: np.ndarray) -> np.ndarray:
        numerator, denominator = np.zeros(shape), np.zeros(shape)
        for start in (0, 8, 16, 24):
            numerator[..., start : start + 16] += weights * ramp
            denominator[..., start : start + 16] += weights
        return numerator / denominator

    expected = blend(weight)
    assert np.abs(expected - blend(np.ones(PATCH))).max() > 0.05  # the weights matter here
    np.testing.assert_allclose(prob, expected, atol=1e-5)
