"""Names the workflow and the package share: splits, NIfTI files, trained models, air.

Standard library only: the workflow imports it before any job runs.
"""

from __future__ import annotations

import re

SPLITS = ("train", "val", "test")
# the splits trained models are evaluated on
EVAL_SPLITS = ("val", "test")

# one study's files under results/nifti/<study>/, as in the autoPET NIfTI release
NIFTI_NAMES = ("CT", "PET", "SUV", "CTres", "SEG")

# what pads a CT beyond the field of view: outside-FOV air as scanners write it
AIR_HU = -1024.0
# what scanners store outside the reconstruction circle (with PixelPaddingValue): no tissue has
# these values, so wherever a CT is read they count as air (AIR_HU)
CT_PADDING_HU = (-3024, -2048)

_TRAINED = re.compile(r"^(?P<variant>[A-Za-z0-9_]+)-seed(?P<seed>[0-9]+)$")
# the wildcard patterns of a configured variant and of a trained model
VARIANT_PATTERN = r"[A-Za-z0-9_]+"
TRAINED_PATTERN = rf"{VARIANT_PATTERN}-seed[0-9]+"


def trained_name(variant: str, seed: int) -> str:
    """A trained model's name, `<variant>-seed<k>`: its folder under results/models/."""
    return f"{variant}-seed{seed}"


def parse_trained(name: str) -> tuple[str, int | None]:
    """(`variant`, seed) of a trained model's name; (name, None) for an untrained baseline."""
    match = _TRAINED.match(name)
    return (match["variant"], int(match["seed"])) if match else (name, None)
