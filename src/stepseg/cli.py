"""The `stepseg` command: predict lesions for new studies outside Snakemake.

    stepseg predict --model model.pt --suv SUV.nii.gz --ctres CTres.nii.gz --out pred.nii.gz
    stepseg predict --model model.pt [--input-dir /input] [--output-dir /output]
    stepseg predict --model fold0/model.pt --model fold1/model.pt ...   # a fold ensemble
    stepseg predict --model stepwise.pt --gate-threshold 0.61 ...  # the lesion-presence gate

The second form is the grand-challenge algorithm container layout used by autoPET: SUV images in
`<input>/images/pet/*.mha`, CTres in `<input>/images/ct/*.mha`, masks written to
`<output>/images/automated-petct-lesion-segmentation/<uuid>.mha`. Inputs are paired by file name
when both folders use the same uuids; otherwise each folder must hold exactly one image, and the
mask takes the CT image's uuid (as in the autoPET baseline containers).

Images in .mha/.mhd/.nrrd are read with SimpleITK and converted exactly to `stepseg.nifti.Volume`
((z, y, x) array + RAS affine): ITK keeps LPS origin/direction/spacing, NIfTI a RAS affine. Every
image is predicted in stepseg's canonical orientation, whatever its storage order, and each mask is
written in its SUV image's own orientation, direction and origin. Several --model options
predict with their ensemble, as the workflow predicts the test split with a seed's fold models:
the mean of the models' probabilities, then one threshold. --gate-threshold drops the components
a stepwise model's whole-crop channel calls lesion-free (`stepseg.gate`), with the threshold the
workflow chose out of fold.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the conventional name)

from stepseg import checks, logs, nifti
from stepseg.atomic import atomic_file
from stepseg.errors import StudyError
from stepseg.settings import Amp, InferSettings

log = logging.getLogger("stepseg.cli")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd")
GC_PET = Path("images/pet")
GC_CT = Path("images/ct")
GC_OUTPUT = Path("images/automated-petct-lesion-segmentation")
ORTHONORMAL_TOLERANCE = 1e-6
# files `write_image` writes whole (a .mhd would leave its pixel file under a temporary name)
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
# errors whose message says all (bad input, missing or unwritable files): no traceback
CLEAR_ERRORS = (StudyError, OSError, ValueError)
# the InferSettings a `stepseg predict` option sets (its default: None, the settings' default)
PREDICT_OPTIONS = ("overlap", "flip_tta", "sw_batch_size", "threshold", "amp")


# --------------------------------------------------------------------------------------------
# SimpleITK <-> Volume


def volume_from_itk(image: sitk.Image) -> nifti.Volume:
    """(z, y, x) array and the RAS affine of an ITK image (LPS direction, spacing, origin)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a 3-D scalar image, got {image.GetDimension()}-D")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return nifti.Volume(array=sitk.GetArrayFromImage(image), affine=affine)


def volume_to_itk(volume: nifti.Volume) -> sitk.Image:
    """The ITK image of a volume; refuses affines ITK cannot hold (shear, zero spacing)."""
    linear = LPS_TO_RAS @ volume.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero voxel size: {volume.affine.tolist()}")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
        raise ValueError("affine is sheared; an ITK image needs orthonormal directions")
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array), isVector=False)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((LPS_TO_RAS @ volume.affine[:3, 3]).tolist())
    return image


def read_image(path: str | Path, study: str) -> nifti.Volume:
    """A NIfTI file through `stepseg.nifti`, anything else (.mha, ...) through SimpleITK; either
    way in `stepseg.names.ORIENTATION`, remembering the file's own (`nifti.from_stored`)."""
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        return nifti.load(path, study, np.float32)
    if not path.is_file():
        raise StudyError(study, "file is missing", path)
    try:
        volume = volume_from_itk(sitk.ReadImage(str(path)))
    except (RuntimeError, ValueError) as exc:
        raise StudyError(study, f"cannot read image ({exc})", path) from exc
    return nifti.from_stored(volume.array.astype(np.float32, copy=False), volume.affine)


def write_image(volume: nifti.Volume, path: str | Path) -> None:
    """Write atomically, in the orientation and affine of the file `volume` was read from:
    NIfTI through `stepseg.nifti`, .mha (compressed) through SimpleITK."""
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        nifti.save(volume, path)
        return
    with atomic_file(path) as tmp:
        sitk.WriteImage(volume_to_itk(nifti.to_stored(volume)), str(tmp), useCompression=True)


# --------------------------------------------------------------------------------------------
# predict


def study_name(suv_path: Path) -> str:
    """The study named in messages: the SUV file's name without extensions."""
    return suv_path.name.split(".")[0]


def grand_challenge_pairs(input_dir: Path, output_dir: Path) -> list[tuple[Path, Path, Path]]:
    """(SUV, CTres, output) paths of the container layout; see the module docstring."""
    pets = {p.name: p for p in sorted((input_dir / GC_PET).glob("*.mha"))}
    cts = {p.name: p for p in sorted((input_dir / GC_CT).glob("*.mha"))}
    if not pets or not cts:
        raise FileNotFoundError(
            f"expected .mha images in {input_dir / GC_PET} and {input_dir / GC_CT} "
            f"(found {len(pets)} and {len(cts)})"
        )
    out = output_dir / GC_OUTPUT
    if set(pets) == set(cts):
        return [(pets[name], cts[name], out / name) for name in sorted(pets)]
    if len(pets) == 1 and len(cts) == 1:
        ((_, pet),), ((name, ct),) = pets.items(), cts.items()
        return [(pet, ct, out / name)]
    raise ValueError(
        f"cannot pair {len(pets)} PET and {len(cts)} CT images: their file names differ "
        "and there is more than one of each"
    )


def check_outputs(paths: Sequence[Path], force: bool) -> None:
    """Refuse destinations before any inference runs (it takes minutes): an extension
    `write_image` cannot write, an existing file without `force`, a folder one cannot write in."""
    for path in paths:
        if not path.name.endswith(OUTPUT_SUFFIXES):
            raise ValueError(
                f"output {path}: unknown image extension; expected {', '.join(OUTPUT_SUFFIXES)}"
            )
        if path.is_dir():
            raise IsADirectoryError(f"output {path} is a directory")
        if path.exists() and not force:
            raise FileExistsError(f"output {path} exists; pass --force to overwrite it")
        folder = next(p for p in path.absolute().parents if p.exists())
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"output {path}: cannot write in {folder}")


def _predict(args: argparse.Namespace) -> int:
    """Predict every study with the given models, each loaded once
    (`stepseg.infer.predict_studies`; several: their mean probability): inputs
    that fail `stepseg.checks` and unusable outputs are refused before the model is loaded."""
    from stepseg import infer  # torch and MONAI load only when a prediction is asked for

    settings = infer_settings(args)
    single = [args.suv, args.ctres, args.out]
    if any(single) and not all(single):
        raise SystemExit("stepseg predict: --suv, --ctres and --out go together")
    if all(single):
        pairs = [(Path(args.suv), Path(args.ctres), Path(args.out))]
    else:
        pairs = grand_challenge_pairs(Path(args.input_dir), Path(args.output_dir))
    check_outputs([out for _, _, out in pairs], args.force)
    studies = [infer.StudyFiles(study_name(suv), suv, ctres, out) for suv, ctres, out in pairs]
    masks = infer.predict_studies(
        [Path(path) for path in args.model], studies, settings,
        device=args.device, ct_hu_range=tuple(args.ct_hu_range),
        read=read_image, write=write_image, gate_threshold=args.gate_threshold,
    )  # fmt: skip
    for study in studies:  # `masks` predicts one study per step
        log.info("study %s: %s + %s -> %s", study.study, study.suv, study.ctres, study.out)
        try:
            voxels = next(masks)
        except CLEAR_ERRORS:
            raise
        except Exception as exc:  # unexpected: the log still says which study and why
            log.error(
                "stepseg predict failed on study %s, file %s: %s: %s",
                study.study, study.suv, type(exc).__name__, exc, exc_info=exc,
            )  # fmt: skip
            return 1
        print(f"{study.out}\t{voxels} lesion voxels")
    return 0


def infer_settings(args: argparse.Namespace) -> InferSettings:
    """The infer rule's settings: `InferSettings`' defaults (those of the shipped config too),
    each replaced by its option where one is given."""
    chosen = {key: getattr(args, key) for key in PREDICT_OPTIONS}
    return InferSettings.from_mapping(
        {key: value for key, value in chosen.items() if value is not None}, "stepseg predict"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict",
        help="segment lesions in new studies (single files or the grand-challenge layout)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument(
        "--model",
        required=True,
        action="append",
        help="model.pt written by the train rule; repeated: the models' mean probability",
    )
    predict.add_argument("--suv", help="SUV image (.nii.gz or .mha)")
    predict.add_argument("--ctres", help="CT resampled to the SUV grid (.nii.gz or .mha)")
    predict.add_argument("--out", help="output mask (.nii.gz, .nii, .mha or .nrrd)")
    predict.add_argument("--force", action="store_true", help="overwrite existing output files")
    predict.add_argument("--log", help="also append the log (and any error) to this file")
    predict.add_argument("--input-dir", default="/input", help="container input root")
    predict.add_argument("--output-dir", default="/output", help="container output root")
    predict.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    default = InferSettings()
    predict.add_argument(
        "--overlap", type=float, help=f"sliding-window overlap (default: {default.overlap})"
    )
    predict.add_argument(
        "--flip-tta",
        action=argparse.BooleanOptionalAction,
        help=f"average over axis flips (default: {default.flip_tta})",
    )
    predict.add_argument(
        "--sw-batch-size",
        type=int,
        help=f"windows per forward pass (default: {default.sw_batch_size})",
    )
    predict.add_argument(
        "--threshold",
        type=float,
        help=f"probability above which a voxel is lesion (default: {default.threshold})",
    )
    predict.add_argument(
        "--amp",
        choices=typing.get_args(Amp),
        help=f"autocast: auto = bf16 on a GPU or a CPU that runs it natively "
        f"(default: {default.amp})",
    )
    predict.add_argument(
        "--gate-threshold",
        type=float,
        help="drop the predicted components whose lesion presence (the whole-crop channel of a "
        "stepwise model) is below this; the workflow's choice is `threshold` in "
        "results/gate/<variant>-seed<k>.json (default: no gate)",
    )
    predict.add_argument(
        "--ct-hu-range",
        type=float,
        nargs=2,
        default=checks.CT_HU_RANGE,
        metavar=("LOW", "HIGH"),
        help="CTres values outside this range are refused (default: %(default)s)",
    )
    predict.set_defaults(handler=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, or 1 after the error (and, unless it is a clear input error, its type and
    traceback) has been logged to stderr and `--log`."""
    args = build_parser().parse_args(argv)
    logs.setup(args.log)
    try:
        return args.handler(args)
    except CLEAR_ERRORS as exc:
        log.error("stepseg %s: %s", args.command, exc)
        return 1
    except Exception as exc:
        log.error("stepseg %s failed: %s: %s", args.command, type(exc).__name__, exc, exc_info=exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
