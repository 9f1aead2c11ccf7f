"""Whole-body inference: MONAI sliding windows over SUV and CTres, normalised window by window.

Training normalises every patch with its own statistics (`stepseg.normalize.normalize_batch`), so
inference does the same, with the same function, for every sliding window (ROI = the training
patch size; the windows of a sliding-window batch are such a batch) before the network sees it;
windows are blended with gaussian weights on the sigmoid of channel 0 and thresholded at 0.5.
A volume smaller than the patch is padded with air (SUV 0, -1024 HU, as in training) and
cropped back.
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

from stepseg import checks, model, nifti, normalize
from stepseg.errors import StudyError
from stepseg.names import AIR_HU
from stepseg.settings import InferSettings

log = logging.getLogger(__name__)


class StudyFiles(NamedTuple):
    """One study to predict: its id (named in every message), its inputs and the mask to write."""

    study: str
    suv: Path
    ctres: Path
    out: Path


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
    mask = predict_mask([model.load(model_path, dev)], suv.array, ctres.array, settings, dev)
    return nifti.to_stored(nifti.Volume(mask, suv.affine, stored_affine=given)).array


def predict_mask(
    models: Sequence[tuple[torch.nn.Module, model.ModelInfo]],
    suv: np.ndarray,
    ct_hu: np.ndarray,
    settings: InferSettings,
    device: torch.device,
) -> np.ndarray:
    """Binary lesion mask (z, y, x) uint8: the lesion probability, averaged over `models` (a
    fold ensemble, as nnU-Net's: the mean of the probabilities, then one threshold), >=
    `settings.threshold`. One model: its own probability, unchanged."""
    total = predict_probability(*models[0], suv, ct_hu, settings, device)
    for net, info in models[1:]:
        total += predict_probability(net, info, suv, ct_hu, settings, device)
    probability = total / len(models) if len(models) > 1 else total
    return (probability >= settings.threshold).astype(np.uint8)


def predict_probability(
    net: torch.nn.Module,
    info: model.ModelInfo,
    suv: np.ndarray,
    ct_hu: np.ndarray,
    settings: InferSettings,
    device: torch.device,
) -> np.ndarray:
    """Gaussian-blended lesion probability (z, y, x) float32 over the whole volume; the window
    is the model's training patch. CT padding values (`names.CT_PADDING_HU`) count as air."""
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

    def window_probability(windows: torch.Tensor) -> torch.Tensor:
        # MONAI hands the windows over on sw_device: normalised there, each on its own
        inputs = normalize.normalize_batch(windows[:, :1], windows[:, 1:])
        inputs = model.network_inputs(inputs, zero_channel)
        inputs = inputs.contiguous(memory_format=model.memory_format(device))
        total = torch.zeros_like(inputs[:, :1], dtype=torch.float32)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            for dims in flips:
                flipped = inputs.flip(dims) if dims else inputs
                logits = net(flipped)[:, :1].float()
                total += torch.sigmoid(logits.flip(dims) if dims else logits)
        return total / len(flips)

    with torch.inference_mode():
        prob = sliding_window_inference(
            raw,
            roi_size=roi,
            sw_batch_size=settings.sw_batch_size,
            predictor=window_probability,
            overlap=settings.overlap,
            mode="gaussian",
            sw_device=device,
            device="cpu",
        )
    out = prob[0, 0][crop].float().numpy()
    if out.shape != shape:
        raise AssertionError(f"prediction shape {out.shape} differs from input {shape}")
    return out


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
) -> Iterator[int]:
    """Predict `studies` with the models of `model_paths` (one, or a fold ensemble averaged by
    `predict_mask`), each loaded once: each study's mask (uint8, SUV grid) is
    written to its `out` in the SUV file's orientation and affine (the network sees the arrays
    in `stepseg.names.ORIENTATION`, as in training); the iterator yields the masks' voxel
    counts, one study per step.

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

    def masks() -> Iterator[int]:
        for files in studies:
            suv, ctres = _read_inputs(files, ct_hu_range, read)
            mask = predict_mask(models, suv.array, ctres.array, settings, dev)
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
    (`predict_mask`): `out_dir/<study>.nii.gz` on SUV's grid.

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
    predictions = predict_studies(model_paths, files, settings, ct_hu_range=ct_hu_range)
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in predictions:
        pass
