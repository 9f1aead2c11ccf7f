import dataclasses
import zipfile

import pytest
import torch

from stepseg import model, presets
from stepseg.settings import TrainSettings

SMALL = {"channels": [4, 8, 16], "num_res_units": 1, "norm": "batch"}


def network_spec(keys, out_channels, zero_input_channel=False):
    settings = TrainSettings.for_variant({**keys, "zero_input_channel": zero_input_channel})
    return model.network_spec(settings, out_channels)


def test_spec_round_trips_through_plain_dict():
    spec = network_spec(SMALL, 8)
    again = model.NetworkSpec.from_dict(spec.to_dict())
    assert again == spec
    assert spec.strides == (2, 2)
    assert spec.divisor == 4
    assert all(isinstance(v, int | float | str | list) for v in spec.to_dict().values())


def test_build_maps_inputs_to_outputs_of_the_patch_shape():
    spec = network_spec(SMALL, 8, zero_input_channel=True)
    net = model.build(spec).eval()
    out = net(torch.zeros(1, 3, 8, 16, 12))
    assert out.shape == (1, 8, 8, 16, 12)


def test_paper_network_has_the_published_levels():
    spec = network_spec({"recipe": "paper"}, 8)
    assert spec.channels == (96, 192, 384, 768, 1536) and spec.num_res_units == 4
    assert spec.strides == (2, 2, 2, 2)
    assert spec.divisor == 16
    model.check_patch_size([32, 160, 160], spec)


def test_patch_size_not_divisible_is_refused_with_the_rule():
    spec = network_spec(SMALL, 1)
    with pytest.raises(ValueError, match=r"divisible by 4"):
        model.check_patch_size([30, 64, 64], spec)


def test_single_level_network_is_refused():
    with pytest.raises(ValueError, match="at least 2 levels"):
        network_spec({**SMALL, "channels": [4]}, 1)


@pytest.mark.parametrize("res_units", [0, 1])
def test_mask_prior_starts_channel_0_near_the_prior(res_units):
    spec = network_spec({**SMALL, "num_res_units": res_units, "norm": "instance"}, 8)
    torch.manual_seed(0)
    net = model.build(spec)
    model.init_mask_prior(net, 0.01)
    with torch.no_grad():
        prob = torch.sigmoid(net(torch.randn(2, 2, 8, 16, 16)))
    assert float(prob[:, 0].mean()) < 0.05
    assert 0.2 < float(prob[:, 1].mean()) < 0.8  # the auxiliary channels are left alone
    with pytest.raises(ValueError, match=r"mask prior must be in \(0, 1\)"):
        model.init_mask_prior(net, 1.0)


def test_two_saves_of_the_same_weights_are_byte_identical(tmp_path):
    """Users compare checksums of model.pt: the temporary file name must not end up inside."""
    keys = {"channels": [4, 8], "num_res_units": 1, "norm": "instance"}
    spec = network_spec(keys, 8)
    torch.manual_seed(0)
    net = model.build(spec)
    info = model.ModelInfo(
        settings=TrainSettings.for_variant(keys), network=spec, target_preset={"name": "paper"}
    )
    for name in ("a/model.pt", "b/model.pt"):
        model.save(tmp_path / name, net, info)
    first, second = ((tmp_path / name).read_bytes() for name in ("a/model.pt", "b/model.pt"))
    assert first == second
    assert zipfile.ZipFile(tmp_path / "a/model.pt").namelist()[0] == "archive/data.pkl"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "model.pt", "model.pt"]


# compute capability -> what `amp: auto` trains and infers in: Volta (V100) and Turing (TITAN RTX,
# T4) emulate bf16, so fp16 with a GradScaler; Ampere (A100) and Hopper (H100) run bf16 natively
CUDA_AUTO = {(7, 0): torch.float16, (7, 5): torch.float16, (8, 0): torch.bfloat16,
             (9, 0): torch.bfloat16}  # fmt: skip


@pytest.mark.parametrize(("capability", "expected"), CUDA_AUTO.items(), ids=str)
def test_amp_auto_on_cuda_takes_bf16_only_where_the_card_runs_it(capability, expected):
    native = model.cuda_native_bf16(capability)
    assert model.choose_autocast("cuda", "auto", native) == expected
    # explicit settings are taken as asked
    assert model.choose_autocast("cuda", "fp16", native) == torch.float16
    assert model.choose_autocast("cuda", "bf16", native) == torch.bfloat16
    assert model.choose_autocast("cuda", "off", native) is None


def test_amp_on_a_cpu_takes_bf16_only_where_it_runs_natively():
    assert model.choose_autocast("cpu", "auto", native_bf16=True) == torch.bfloat16
    assert model.choose_autocast("cpu", "bf16", native_bf16=True) == torch.bfloat16
    assert model.choose_autocast("cpu", "auto", native_bf16=False) is None
    with pytest.raises(ValueError, match="this CPU has no native bf16"):
        model.choose_autocast("cpu", "bf16", native_bf16=False)
    with pytest.raises(ValueError, match="amp fp16 needs a CUDA device"):
        model.choose_autocast("cpu", "fp16", native_bf16=True)


def test_cudnn_autotuning_is_for_cuda_only(monkeypatch):
    """Selecting cuDNN's fastest algorithms per input shape (`cudnn.benchmark`) on CUDA; torch's
    default elsewhere. Creating a CUDA device object needs no GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    model.autotune_convolutions(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    model.autotune_convolutions(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True


def test_a_model_file_from_before_a_training_key_existed_still_loads(tmp_path):
    """Model files of earlier versions lack the keys added since (`lesion_centres`): they load,
    and say the behaviour every model had before the key existed."""
    settings = TrainSettings.for_variant({"channels": [4, 8], "patch_size": [8, 16, 16]})
    info = model.ModelInfo(
        settings=settings,
        network=model.network_spec(settings, out_channels=1),
        target_preset=presets.PAPER.to_dict(),
    )
    path = tmp_path / "model.pt"
    model.save(path, model.build(info.network), info)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["settings"]["lesion_centres"]
    torch.save(checkpoint, path)
    _, loaded = model.load(path, torch.device("cpu"))
    assert loaded.settings.lesion_centres == "voxel"
    assert loaded.settings == dataclasses.replace(settings, lesion_centres="voxel")
