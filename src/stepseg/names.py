"""Names the workflow and the package share: splits, study ids, series folders, NIfTI files,
trained models, air, the canonical orientation.

Standard library only: the workflow imports it before any job runs.
"""

from __future__ import annotations

import re

SPLITS = ("train", "val", "test")
# Every split a trained model may be evaluated on, in report order: "oof" = every non-test study,
# predicted by the one fold model that did not train on it (`train.folds` >= 2)
EVAL_SPLITS = ("oof", "val", "test")
OUT_OF_FOLD = "oof"


def eval_splits(folds: int) -> tuple[str, ...]:
    """The splits trained models are evaluated on with `folds` folds: out-of-fold and test with
    cross-validation, else validation and test. The one place the rule lives (workflow, report).
    """
    return (OUT_OF_FOLD, "test") if folds >= 2 else ("val", "test")


def fold_folder(fold: int) -> str:
    """`fold<f>`: a fold's folder under results/lmdb/, results/models/<trained>/ and
    results/train_state/<trained>/ (fold0 alone without cross-validation: one layout)."""
    return f"fold{fold}"


def fold_model_name(trained: str, fold: int) -> str:
    """`<variant>-seed<k>-fold<f>`: one fold model in logs and training-curve figures."""
    return f"{trained}-{fold_folder(fold)}"


_STUDY_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def study_id(patient_id: str, visit: int) -> str:
    """The study id used everywhere downstream: `<PatientID>_<visit>` (visit 1 = the patient's
    first study by date), reduced to a safe file name and Snakemake wildcard. Every source names
    its studies so: the synthetic cohort served over the NBIA API lists under the same ids."""
    return _STUDY_ID_UNSAFE.sub("-", f"{patient_id}_{visit}").strip("-_.")


def series_folder(number: int, description: str, series_uid: str) -> str:
    """The NBIA Data Retriever's series folder name, `<number>.000000-<description>-<uid5>`,
    reduced to characters safe in paths and shells: TCIA downloads and the synthetic cohort's
    series land in folders of this name, so both convert identically."""
    safe = re.sub(r"[^A-Za-z0-9.]+", "_", description).strip("_")
    return f"{number}.000000-{safe}-{series_uid[-5:]}"


# one study's files under results/nifti/<study>/, as in the autoPET NIfTI release
NIFTI_NAMES = ("CT", "PET", "SUV", "CTres", "SEG")

# what pads a CT beyond the field of view: outside-FOV air as scanners write it
AIR_HU = -1024.0
# what scanners store outside the reconstruction circle (with PixelPaddingValue): no tissue has
# these values, so wherever a CT is read they count as air (AIR_HU)
CT_PADDING_HU = (-3024, -2048)

# The orientation every stage holds its arrays in (`stepseg.nifti`), and the one models are trained
# in: nibabel axis codes of the NIfTI axes (i, j, k) = the array's (x, y, z), i.e. x runs towards
# the patient's left, y towards posterior, z towards superior (feet to head). It is DICOM's own
# patient frame, in which stepseg's conversion of axial series has always written its files.
ORIENTATION = "LPS"

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


# the lesion-presence gate's variant of a trained one (`stepseg.gate`): `<variant>_gated-seed<k>`
GATED_SUFFIX = "_gated"


def gated_name(trained: str) -> str:
    """`<variant>_gated-seed<k>`: the gated predictions of the trained model `trained`."""
    variant, seed = parse_trained(trained)
    if seed is None:
        raise ValueError(f"{trained} is not a trained model's name (<variant>-seed<k>)")
    return trained_name(variant + GATED_SUFFIX, seed)
