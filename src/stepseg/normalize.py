"""Input normalisation of the released code, per patch (training) or per sliding window (inference).

CT: `(clip(HU, -1000, 1000) + 1000) / 500`, i.e. -1000 HU -> 0 and +1000 HU -> 4.
PET: `z(log2(SUV + 1)) / 2 + 1`, where the z-score uses the mean and (population) standard deviation
of the voxels with log2(SUV + 1) > 0.14 (SUV > 0.102) in the same patch, as the released code
thresholds the log-transformed image, the standard deviation floored at 0.01. A patch with no
such voxel (air only) uses mean 0 and standard deviation 1, so it is not blown up.

`normalize_batch` is the one implementation: a batch of patches (training, validation) or of
sliding windows (inference), each with its own statistics, vectorised over the batch in torch on
the batch's device. The loader ships the compact stored values (SUV float16, HU int16) and the
network's device does this work, so on a GPU it costs the host nothing and host-to-device
traffic stays at the stored 4 bytes a voxel instead of 8.
"""

from __future__ import annotations

import numpy as np
import torch

CT_CLIP_HU = (-1000.0, 1000.0)
CT_SCALE_HU = 500.0
PET_FOREGROUND_LOG2 = 0.14  # on log2(SUV + 1)
PET_STD_FLOOR = 0.01

Array = np.ndarray | torch.Tensor


def ct_from_normalized(ct_norm: Array) -> Array:
    """HU of a normalised CT value (exact inside the clip range); used for CT window channels."""
    return ct_norm * CT_SCALE_HU + CT_CLIP_HU[0]


def normalize_batch(suv: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
    """Normalised [PET, CT] float32 (B, 2, D, H, W) of SUV and HU batches (B, 1, D, H, W).

    Any float or integer dtype, any device; the result lives on the inputs' device and every
    sample is normalised with its own statistics, as the released code did patch by patch.
    """
    if suv.ndim < 3 or suv.shape[1] != 1 or hu.shape != suv.shape:
        raise ValueError(
            f"expected SUV and HU batches of equal shape (B, 1, ...), got "
            f"{tuple(suv.shape)} and {tuple(hu.shape)}"
        )
    if hu.device != suv.device:
        raise ValueError(f"SUV on {suv.device} but HU on {hu.device}")
    n = suv.shape[0]
    out = torch.empty((n, 2, *suv.shape[2:]), dtype=torch.float32, device=suv.device)
    ct = out[:, 1].copy_(hu[:, 0]).clamp_(*CT_CLIP_HU)
    ct.sub_(CT_CLIP_HU[0]).div_(CT_SCALE_HU)
    pet = out[:, 0].copy_(suv[:, 0])
    pet.add_(1.0).log2_()
    foreground = torch.gt(pet, PET_FOREGROUND_LOG2).reshape(n, -1).to(torch.float32)
    flat = pet.view(n, -1)  # in place: each sample's PET plane is contiguous
    count = foreground.sum(dim=1)
    has_foreground = count > 0
    count.clamp_(min=1.0)
    mean = torch.mul(flat, foreground).sum(dim=1).div_(count)
    squares = torch.sub(flat, mean[:, None]).square_().mul_(foreground)
    std = squares.sum(dim=1).div_(count).sqrt_().clamp_(min=PET_STD_FLOOR)
    mean = torch.where(has_foreground, mean, 0.0)
    std = torch.where(has_foreground, std, 1.0)
    flat.sub_(mean[:, None]).div_(2.0 * std[:, None]).add_(1.0)
    return out
