"""Source interface for the synthetic cohort (`download.source: synthetic`).

`list_studies` is the cohort plan (fast, no images); `fetch_study` generates one study into a
fresh directory: the CT, PET and SEG series as DICOM (TCIA layout) and the ground truth the
converter must reproduce under `truth/` (SUV, SEG and CTres on the PET grid, NIfTI).
Each study is generated from its own seeded generators, so studies can be made in parallel jobs
and reruns are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stepseg.errors import StudyError
from stepseg.nifti import Volume, save
from stepseg.synthetic import dicom_writer, phantom, scanner
from stepseg.synthetic.plan import StudyPlan, plan_cohort, rng_for, settings_with_defaults

log = logging.getLogger(__name__)

# purposes of the per-study random generators (the plan uses 0, 1 and 2)
_UPTAKE, _GEOMETRY, _PET_NOISE, _CT_NOISE, _TEXTURE = 3, 4, 5, 6, 7


def _uids(settings: Mapping[str, Any], study_id: str) -> dicom_writer.StudyUIDs:
    """UIDs depend on every setting, so different images never share a UID."""
    text = json.dumps(settings_with_defaults(settings), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return dicom_writer.StudyUIDs(entropy=("stepseg-synthetic", digest, study_id))


def list_studies(settings: Mapping[str, Any]) -> list[dict]:
    """One record per study: ids, lesion status and the series folders fetch_study will make."""
    return [
        {
            "study_id": plan.study_id,
            "patient_id": plan.patient_id,
            "has_lesions": plan.has_lesions,
            **dicom_writer.series_folders(_uids(settings, plan.study_id)),
        }
        for plan in plan_cohort(settings)
    ]


def _find(settings: Mapping[str, Any], study_id: str) -> StudyPlan:
    for plan in plan_cohort(settings):
        if plan.study_id == study_id:
            return plan
    raise StudyError(study_id, "not in the synthetic cohort of these settings")


def scene(
    settings: Mapping[str, Any], plan: StudyPlan
) -> tuple[phantom.ScanGeometry, list[phantom.Shape], np.ndarray]:
    """The study's scan geometry, anatomy shapes and organ uptake (what `phantom.render` needs)."""
    keys = (plan.patient_index, plan.visit)
    geometry = phantom.scan_geometry(rng_for(settings, _GEOMETRY, *keys), settings)
    shapes = phantom.build_anatomy(settings, plan.anatomy)
    uptake = phantom.draw_uptake(rng_for(settings, _UPTAKE, *keys))
    return geometry, shapes, uptake


def fetch_study(settings: Mapping[str, Any], row: dict, out_dir: Path) -> None:
    """Generate one study's DICOM series and `truth/{SUV,SEG,CTres}.nii.gz` into `out_dir`."""
    started = time.perf_counter()
    settings = settings_with_defaults(settings)
    out_dir = Path(out_dir)
    plan = _find(settings, row["study_id"])
    uids = _uids(settings, plan.study_id)
    expected = dicom_writer.series_folders(uids)
    for column, folder in expected.items():
        if row.get(column, folder) != folder:
            raise StudyError(
                plan.study_id,
                f"manifest {column} {row[column]!r} differs from the generated {folder!r}: "
                "the manifest was written with other download.synthetic settings",
            )
    keys = (plan.patient_index, plan.visit)
    geometry, shapes, uptake = scene(settings, plan)
    # one modality at a time, each array freed once written: at the collection's grids this
    # halves a study's peak RSS (1.9 to 1.0 GB); every series has its own generator, so the
    # order changes no byte
    _write_ct(out_dir, settings, plan, uids, geometry, shapes, keys)
    labels, suv_true, mask = phantom.render(
        geometry.pet, geometry.table_offset, shapes, plan.lesions, uptake
    )
    suv_true *= phantom.uptake_texture(rng_for(settings, _TEXTURE, *keys), geometry.pet)
    suv = scanner.pet_suv(
        suv_true,
        geometry.pet.spacing,
        float(settings["pet_fwhm_mm"]),
        float(settings["pet_noise"]),
        plan,
        rng_for(settings, _PET_NOISE, *keys),
    )
    del suv_true
    _, pet_datasets, encoded_suv = dicom_writer.write_pet(out_dir, plan, uids, geometry.pet, suv)
    del suv
    dicom_writer.write_seg(out_dir, plan, uids, pet_datasets, mask, settings["seg_layout"])
    del pet_datasets

    affine = geometry.pet.ras_affine()
    truth = out_dir / "truth"
    truth.mkdir()
    save(Volume(encoded_suv, affine), truth / "SUV.nii.gz")
    del encoded_suv
    save(Volume(mask.astype(np.uint8), affine), truth / "SEG.nii.gz")
    save(Volume(phantom.HU[labels], affine), truth / "CTres.nii.gz")
    log.info(
        "study %s: %d lesion(s), %.1f ml, generated in %.1f s",
        plan.study_id,
        len(plan.lesions),
        float(mask.sum()) * float(np.prod(geometry.pet.spacing)) / 1000.0,
        time.perf_counter() - started,
    )


def _write_ct(
    out_dir: Path,
    settings: Mapping[str, Any],
    plan: StudyPlan,
    uids: dicom_writer.StudyUIDs,
    geometry: phantom.ScanGeometry,
    shapes: list[phantom.Shape],
    keys: tuple[int, int],
) -> None:
    """Render the CT on its own grid, add its noise and write the series (its arrays are freed
    on return: the CT is a study's largest image)."""
    labels, _, _ = phantom.render(
        geometry.ct, geometry.table_offset, shapes, plan.lesions, uptake=None
    )
    hu = scanner.ct_hu(labels, phantom.HU, rng_for(settings, _CT_NOISE, *keys))
    del labels
    padding = settings["ct_padding_hu"]
    if padding is not None:
        scanner.pad_outside_circle(hu, geometry.ct.spacing, padding)
    dicom_writer.write_ct(out_dir, plan, uids, geometry.ct, hu, padding)
