"""Whole-body inference: MONAI sliding windows over SUV and CTres, normalised window by window.

Training normalises every patch with its own statistics (`stepseg.normalize.normalize_batch`), so
inference does the same, with the same function, for every sliding window (ROI = the training
patch size; the windows of a sliding-window batch are such a batch) before the network sees it;
windows are blended with gaussian weights on the sigmoid of channel 0 and thresholded at 0.5.
A volume smaller than the patch is padded with air (SUV 0, -1024 HU, as in training) and
cropped back. A model with a trained whole-crop channel also gives each predicted component its
lesion presence (`stepseg.gate`), written beside the mask as `<study>.presence.nii.gz`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.nn import functional

from stepseg import checks, gate, model, nifti, normalize
from stepseg.errors import StudyError
from stepseg.names import AIR_HU
from stepseg.presets import Preset
from stepseg.settings import InferSettings

log = logging.getLogger(__name__)


class StudyFiles(NamedTuple):
    """One study to predict: its id (named in every message), its inputs and the mask to write
    (the presence map, where the models give one, beside it: `gate.presence_path`)."""

    study: str
    suv: Path
    ctres: Path
    out: Path


class Prediction(NamedTuple):
    """A study's binary lesion mask (z, y, x) uint8 and, where every model has a trained
    whole-crop channel, its components' lesion presence (`gate.component_presence`), else None."""

    mask: np.ndarray
    presence: np.ndarray | None


# (path, study) -> volume in `stepseg.names.ORIENTATION`, failures naming both
Read = Callable[[Path, str], nifti.Volume]
Write = Callable[[nifti.Volume, Path], None]  # writes back in the volume's stored orientation
READ_NIFTI: Read = partial(nifti.load, dtype=np.float32)


def predict_volume(
    model_path: str | Path,
    suv: nifti.Volume,
    ctres: nifti.Volume,
    settings: InferSettings,
    device: str | torch.device | None = None,
    study: str = "study",
) -> np.ndarray:
    """Binary lesion mask (z, y, x) uint8 on the SUV grid, in the SUV volume's orientation; the
    network sees both volumes in `stepseg.names.ORIENTATION`."""
    given = suv.affine
    suv, ctres = nifti.reorient(suv), nifti.reorient(ctres)
    if suv.array.shape != ctres.array.shape:
        raise StudyError(
            study, f"SUV shape {suv.array.shape} and CTres shape {ctres.array.shape} differ"
        )
    dev = model.resolve_device(device)
    mask = predict([model.load(model_path, dev)], suv.array, ctres.array, settings, dev).mask
    return nifti.to_stored(nifti.Volume(mask, suv.affine, stored_affine=given)).array


def predict(
    models: Sequence[tuple[torch.nn.Module, model.ModelInfo]],
    suv: np.ndarray,
    ct_hu: np.ndarray,
    settings: InferSettings,
    device: torch.device,
) -> Prediction:
    """The lesion probability, averaged over `models` (a fold ensemble, as nnU-Net's: the mean
    of the probabilities, then one threshold), >= `settings.threshold`; one model: its own
    probability, unchanged. The window presence is averaged likewise, where every model has it."""
    outputs = [predict_probability(net, info, suv, ct_hu, settings, device) for net, info in models]
    probability, presence = outputs[0]
    for more_probability, more_presence in outputs[1:]:
        probability += more_probability
        presence = None if presence is None or more_presence is None else presence + more_presence
    if len(outputs) > 1:
        probability /= len(outputs)
    mask = (probability >= settings.threshold).astype(np.uint8)
    if presence is None:
        return Prediction(mask, None)
    return Prediction(mask, gate.component_presence(mask, presence / len(outputs)))


def predict_probability(
    net: torch.nn.Module,
    info: model.ModelInfo,
    suv: np.ndarray,
    ct_hu: np.ndarray,
    settings: InferSettings,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gaussian-blended lesion probability (z, y, x) float32 over the whole volume and, for a
    model with a trained whole-crop channel, the blended window presence (`window_presence`,
    else None); the window is the model's training patch. CT padding values
    (`names.CT_PADDING_HU`) count as air."""
    roi = info.settings.patch_size
    shape = suv.shape
    raw = torch.stack(
        [
            torch.from_numpy(np.asarray(suv, np.float32)),
            torch.from_numpy(checks.air_for_padding(np.asarray(ct_hu, np.float32))),
        ]
    )[None]
    raw, crop = _pad_to(raw, roi)
    zero_channel = info.settings.zero_input_channel
    amp_dtype = model.autocast_dtype(device, settings.amp)
    flips = [()] + ([(2,), (3,), (4,)] if settings.flip_tta else [])
    whole = presence_channel(info)

    def window_outputs(windows: torch.Tensor) -> torch.Tensor:
        # MONAI hands the windows over on sw_device: normalised there, each on its own
        normalized = normalize.normalize_batch(windows[:, :1], windows[:, 1:])
        inputs = model.network_inputs(normalized, zero_channel)
        inputs = inputs.contiguous(memory_format=model.memory_format(device))
        channels = 1 if whole is None else 2
        total = torch.zeros_like(inputs[:, :channels], dtype=torch.float32)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            for dims in flips:
                flipped = inputs.flip(dims) if dims else inputs
                output = net(flipped).float()
                output = output.flip(dims) if dims else output
                total[:, :1] += torch.sigmoid(output[:, :1])
                if whole is not None:
                    index, fill = whole
                    factor = window_presence(output[:, index : index + 1], normalized, fill)
                    total[:, 1:] += factor.view(-1, 1, 1, 1, 1)
        return total / len(flips)

    with torch.inference_mode():
        blended = sliding_window_inference(
            raw,
            roi_size=roi,
            sw_batch_size=settings.sw_batch_size,
            predictor=window_outputs,
            overlap=settings.overlap,
            mode="gaussian",
            sw_device=device,
            device="cpu",
        )
    out = blended[0][(slice(None), *crop)].float().numpy()
    if out.shape[1:] != shape:
        raise AssertionError(f"prediction shape {out.shape[1:]} differs from input {shape}")
    return out[0], (out[1] if whole is not None else None)


def presence_channel(info: model.ModelInfo) -> tuple[int, str] | None:
    """(index, fill) of a model's trained whole-crop output channel (`gate.whole_crop_channel`);
    None for a plain model, whose file keeps the preset it was packed with but one output."""
    if info.settings.targets != "stepwise":
        return None
    return gate.whole_crop_channel(Preset.from_dict(info.target_preset))


def window_presence(whole: torch.Tensor, inputs: torch.Tensor, fill: str) -> torch.Tensor:
    """Per window (B,) the least-squares factor of the whole-crop channel `whole` (B, 1, ...)
    on its fill, taken from the normalised network inputs (B, 2, ...) [PET, CT]."""
    if fill == "one":
        reference = torch.ones_like(whole)
    else:
        reference = inputs[:, :1] if fill == "pet" else inputs[:, 1:2]
    reference = reference.float()
    dims = tuple(range(1, whole.ndim))
    energy = reference.square().sum(dim=dims)
    factor = (whole.float() * reference).sum(dim=dims) / energy.clamp(min=1e-6)
    return torch.where(energy > 1e-6, factor, torch.zeros_like(factor))


def _pad_to(raw: torch.Tensor, roi: tuple[int, ...]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad each axis shorter than the ROI with air (SUV 0, -1024 HU), centred; return the crop."""
    shape = raw.shape[2:]
    before = [max(r - s, 0) // 2 for s, r in zip(shape, roi, strict=True)]
    after = [max(r - s, 0) - b for s, r, b in zip(shape, roi, before, strict=True)]
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape, strict=True))
    if not any(before) and not any(after):
        return raw, crop
    pad = [p for b, a in zip(reversed(before), reversed(after), strict=True) for p in (b, a)]
    suv = functional.pad(raw[:, :1], pad, value=0.0)
    ct = functional.pad(raw[:, 1:], pad, value=AIR_HU)
    return torch.cat([suv, ct], dim=1), crop


def predict_studies(
    model_paths: Sequence[str | Path],
    studies: Sequence[StudyFiles],
    settings: InferSettings,
    *,
    device: str | torch.device | None = None,
    ct_hu_range: tuple[float, float] = checks.CT_HU_RANGE,
    read: Read = READ_NIFTI,
    write: Write = nifti.save,
    write_presence: bool = False,
    gate_threshold: float | None = None,
) -> Iterator[int]:
    """Predict `studies` with the models of `model_paths` (one, or a fold ensemble averaged by
    `predict`), each loaded once: each study's mask (uint8, SUV grid) is
    written to its `out` in the SUV file's orientation and affine (the network sees the arrays
    in `stepseg.names.ORIENTATION`, as in training); the iterator yields the masks' voxel
    counts, one study per step. With `write_presence`, the presence map goes beside each mask
    (`gate.presence_path`) where every model has a trained whole-crop channel; with
    `gate_threshold`, the mask keeps only the components whose presence reaches it
    (`gate.apply`), which needs such models.

    Every study's inputs pass `stepseg.checks` before the model is loaded, here, not at the first
    step, so that a failing one is named with its file before any work. The rule (`predict_split`)
    and `stepseg predict` both predict through this; `read` and `write` are the file formats'.
    """
    for files in studies:  # every input, before any work
        _read_inputs(files, ct_hu_range, read)
    dev = model.resolve_device(device)
    if not model_paths:
        raise ValueError("no model to predict with")
    model.autotune_convolutions(dev)
    models = [model.load(path, dev) for path in model_paths]
    described = " + ".join(str(path) for path in model_paths)
    if gate_threshold is not None:
        lacking = [
            str(path)
            for path, (_, info) in zip(model_paths, models, strict=True)
            if presence_channel(info) is None
        ]
        if lacking:
            raise ValueError(
                f"the lesion-presence gate needs a trained whole-crop channel, which "
                f"{', '.join(lacking)} lacks (a plain model, or targets without a whole step)"
            )

    def masks() -> Iterator[int]:
        for files in studies:
            suv, ctres = _read_inputs(files, ct_hu_range, read)
            mask, presence = predict(models, suv.array, ctres.array, settings, dev)
            if gate_threshold is not None:
                mask = gate.apply(mask, presence, gate_threshold)
            if write_presence and presence is not None:
                write(replace(suv, array=presence), gate.presence_path(files.out))
            write(replace(suv, array=mask), files.out)  # stored like the SUV file
            log.info(
                "%s: %d lesion voxels (%.2f ml) predicted with %s",
                files.study, int(mask.sum()), float(mask.sum()) * suv.voxel_ml, described,
            )  # fmt: skip
            yield int(mask.sum())

    return masks()


def _read_inputs(
    files: StudyFiles, ct_hu_range: tuple[float, float], read: Read
) -> tuple[nifti.Volume, nifti.Volume]:
    """SUV and CTres of one study after `stepseg.checks` (one grid, plausible values)."""
    suv = read(files.suv, files.study)
    ctres = read(files.ctres, files.study)
    checks.check_suv_ctres(files.study, (files.suv, suv), (files.ctres, ctres), ct_hu_range)
    return suv, ctres


def predict_split(
    *,
    model_paths: Sequence[str | Path],
    studies: Sequence[str],
    suv_paths: Sequence[str | Path],
    ctres_paths: Sequence[str | Path],
    out_dir: str | Path,
    settings: InferSettings,
    threads: int,
    ct_hu_range: tuple[float, float] = checks.CT_HU_RANGE,
) -> None:
    """Predict `studies` (an infer job's chunk of a split) with one model or a fold ensemble
    (`predict`): `out_dir/<study>.nii.gz` on SUV's grid, and where the models have a trained
    whole-crop channel the presence map `out_dir/<study>.presence.nii.gz` (`stepseg.gate`).

    One process per chunk of studies instead of one per study: importing torch and MONAI and
    loading the model took about three times as long as predicting one 128 x 88 x 88 study on
    a CPU, so per-study jobs spent most of the inference phase starting up.
    """
    if not len(studies) == len(suv_paths) == len(ctres_paths):
        raise ValueError(
            f"{len(studies)} studies but {len(suv_paths)} SUV and {len(ctres_paths)} CTres files"
        )
    out_dir = Path(out_dir)
    files = [
        StudyFiles(study, Path(suv), Path(ctres), out_dir / f"{study}.nii.gz")
        for study, suv, ctres in zip(studies, suv_paths, ctres_paths, strict=True)
    ]
    torch.set_num_threads(max(1, int(threads)))
    predictions = predict_studies(
        model_paths, files, settings, ct_hu_range=ct_hu_range, write_presence=True
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in predictions:
        pass
