import re

import nibabel as nib
import numpy as np
import pytest
import torch

from stepseg import infer, model, nifti, normalize
from stepseg.errors import StudyError

PATCH = [8, 16, 16]
CFG = {"channels": [4, 8], "num_res_units": 1, "norm": "instance"}
AFFINE = np.array([[-4.0, 0, 0, 10.0], [0, -4.0, 0, 20.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])


def _checkpoint(path, zero_channel=False):
    spec = model.network_spec(CFG, out_channels=8, in_channels=3 if zero_channel else 2)
    torch.manual_seed(0)
    net = model.build(spec)
    with torch.no_grad():  # a bias so the mask is neither empty nor full
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save(path, net, spec, {"patch_size": PATCH, "zero_input_channel": zero_channel})
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
        loaded, checkpoint, suv.array, ct.array, {**infer.DEFAULTS}, torch.device("cpu")
    )
    np.testing.assert_allclose(prob, _manual_probability(net, suv.array, ct.array), atol=1e-5)
    mask = infer.predict_volume(path, suv, ct, {})
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
        {**infer.DEFAULTS, "flip_tta": True},
        torch.device("cpu"),
    )
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
        {**infer.DEFAULTS, "overlap": 0.0},
        torch.device("cpu"),
    )
    windows = torch.cat(seen)
    assert windows.shape[0] == 2
    for w in windows:  # each window's PET z-scored on its own: mean 1, std 1/2
        assert float(w[0].mean()) == pytest.approx(1.0, abs=1e-4)
        assert float(w[0].std(unbiased=False)) == pytest.approx(0.5, abs=1e-4)


def test_volume_smaller_than_the_patch_is_padded_not_a_crash(tmp_path):
    path = tmp_path / "model.pt"
    _checkpoint(path, zero_channel=True)
    suv, ct = _volumes((5, 11, 30))
    mask = infer.predict_volume(path, suv, ct, {"overlap": 0.5})
    assert mask.shape == (5, 11, 30)
    assert mask.dtype == np.uint8


def test_predict_files_keeps_the_suv_grid(tmp_path):
    path = tmp_path / "model.pt"
    _checkpoint(path)
    suv, ct = _volumes((10, 20, 18))
    nifti.save(suv, tmp_path / "S1" / "SUV.nii.gz")
    nifti.save(ct, tmp_path / "S1" / "CTres.nii.gz")
    out = tmp_path / "pred" / "S1.nii.gz"
    infer.predict_files(
        path, tmp_path / "S1" / "SUV.nii.gz", tmp_path / "S1" / "CTres.nii.gz", out, {}, 1
    )
    image = nib.load(out)
    assert image.shape == (18, 20, 10)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, AFFINE)
    assert set(np.unique(np.asarray(image.dataobj))) <= {0, 1}


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
def test_predict_files_refuses_bad_inputs_before_loading_the_model(
    tmp_path, volume, value, message
):
    """A block of NaN used to erase true lesions in every sliding window that touched it."""
    suv_path, ctres_path = _bad_study(tmp_path, volume, value)
    out = tmp_path / "pred" / "S1.nii.gz"
    bad = re.escape(str(tmp_path / "S1" / f"{volume}.nii.gz"))
    with pytest.raises(StudyError, match=f"study S1, file {bad}: {message}"):
        infer.predict_files(tmp_path / "no-model.pt", suv_path, ctres_path, out, {}, 1)
    assert not out.parent.exists()


def test_a_wider_configured_ct_range_lets_the_study_through(tmp_path):
    suv_path, ctres_path = _bad_study(tmp_path, "CTres", 5000.0)
    with pytest.raises(FileNotFoundError, match=r"no-model\.pt does not exist"):
        infer.predict_files(
            tmp_path / "no-model.pt", suv_path, ctres_path, tmp_path / "p.nii.gz", {}, 1,
            ct_hu_range=(-1100.0, 5000.0),
        )  # fmt: skip


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
    with pytest.raises(ValueError, match=r"other.pt is not a stepseg-model-1 model file"):
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
        settings = {**infer.DEFAULTS, "amp": amp}
        probability[device, amp] = infer.predict_probability(
            net, checkpoint, suv.array, ct.array, settings, torch.device(device)
        )
    reference = probability["cpu", "off"]
    # float32 on the GPU (TF32 convolutions allowed): the same probabilities to about 1e-3
    np.testing.assert_allclose(probability["cuda", "off"], reference, atol=2e-3)
    # autocast (bf16 where supported): a few hundredths at most
    np.testing.assert_allclose(probability["cuda", "auto"], reference, atol=5e-2)
    assert probability["cuda", "auto"].dtype == np.float32
