"""The synthetic cohort plan: who is scanned when, with which dose, and where the lesions are.

The plan is a pure, fast function of the settings (no images), so the manifest can be written
without generating anything, and every study can later be generated on its own (in parallel jobs)
from the same plan. Which patients return and which studies have lesions is drawn for the cohort
as a whole, so that both fractions are exact; every other draw comes from a generator seeded by
(seed, purpose, patient, visit), so it does not depend on how many other patients there are.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepseg.names import study_id
from stepseg.settings import SyntheticSettings
from stepseg.synthetic import phantom
from stepseg.synthetic.phantom import Lesion

F18_HALF_LIFE_S = 6586.2


@dataclass(frozen=True)
class StudyPlan:
    """Everything that varies per study; the images follow from it and the settings."""

    study_id: str
    patient_id: str
    patient_index: int
    visit: int  # 1 = baseline, 2 = follow-up
    sex: str
    birth_date: str
    height_m: float
    weight_kg: float
    dose_bq: float
    study_date: str  # YYYYMMDD
    injection_time: str  # HHMMSS
    series_time: str  # HHMMSS, PET decay reference
    acquisition_delay_s: int  # first bed starts this long after SeriesTime
    anatomy: Mapping[str, Any]
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)

    @property
    def has_lesions(self) -> bool:
        return bool(self.lesions)

    @property
    def uptake_s(self) -> float:
        return seconds_of_day(self.series_time) - seconds_of_day(self.injection_time)


def settings_with_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The checked settings with the optional keys filled in (`SyntheticSettings`), as the plain
    values the generator and the UIDs' hash read; inverted ranges are refused."""
    return SyntheticSettings.from_mapping(settings).to_dict()


def rng_for(settings: Mapping[str, Any], *keys: int) -> np.random.Generator:
    """A generator that depends only on the cohort seed and `keys` (purpose, patient, visit)."""
    return np.random.default_rng(np.random.SeedSequence([int(settings["seed"]), *keys]))


def seconds_of_day(hhmmss: str) -> int:
    """Seconds since midnight of a DICOM TM value (whole seconds)."""
    return int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6])


def hhmmss(seconds: float) -> str:
    """A DICOM TM value (whole seconds) for seconds since midnight (all studies end by 24 h)."""
    s = round(seconds)
    return f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}"


def plan_cohort(settings: Mapping[str, Any]) -> list[StudyPlan]:
    """The whole cohort: patients, their (one or two) studies, lesion status and lesions."""
    settings = settings_with_defaults(settings)
    n_patients = int(settings["n_patients"])
    cohort_rng = rng_for(settings, 0)
    n_repeat = round(float(settings["repeat_fraction"]) * n_patients)
    repeated = set(cohort_rng.permutation(n_patients)[:n_repeat].tolist())
    visits = [(p, v) for p in range(n_patients) for v in (1, 2) if v == 1 or p in repeated]
    n_lesion = round(float(settings["lesion_fraction"]) * len(visits))
    positive = {visits[i] for i in cohort_rng.permutation(len(visits))[:n_lesion].tolist()}

    plans = []
    for patient in range(n_patients):
        rng = rng_for(settings, 1, patient)
        sex = "F" if rng.random() < 0.45 else "M"
        height = float(np.clip(rng.normal(1.66 if sex == "F" else 1.78, 0.07), 1.50, 1.98))
        weight = float(np.clip(rng.normal(24.5, 4.0) * height**2, 50.0, 110.0))
        age = int(rng.integers(25, 85))
        baseline = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
        birth = dt.date(baseline.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        anatomy = phantom.draw_anatomy(rng, sex, height, weight)
        previous: tuple[Lesion, ...] = ()
        for visit in (1, 2):
            if visit == 2 and patient not in repeated:
                continue
            vrng = rng_for(settings, 2, patient, visit)
            date = baseline + dt.timedelta(days=0 if visit == 1 else int(vrng.integers(60, 400)))
            visit_weight = round(weight * (1.0 if visit == 1 else vrng.uniform(0.9, 1.05)), 1)
            visit_weight = float(np.clip(visit_weight, 50.0, 110.0))
            dose_mbq = float(np.clip(vrng.normal(3.5, 0.6) * visit_weight, 150.0, 400.0))
            injection = int(vrng.integers(7 * 3600 + 1800, 14 * 3600))
            uptake = int(vrng.integers(50 * 60, 80 * 60 + 1))
            acquisition_delay = int(vrng.integers(5, 40))
            patient_id = f"SYN{patient:04d}"
            lesions: tuple[Lesion, ...] = ()
            if (patient, visit) in positive:
                lesions = phantom.draw_lesions(vrng, settings, anatomy, previous)
                previous = lesions
            plans.append(
                StudyPlan(
                    study_id=study_id(patient_id, visit),
                    patient_id=patient_id,
                    patient_index=patient,
                    visit=visit,
                    sex=sex,
                    birth_date=birth.strftime("%Y%m%d"),
                    height_m=round(height, 2),
                    weight_kg=visit_weight,
                    dose_bq=round(dose_mbq, 1) * 1e6,
                    study_date=date.strftime("%Y%m%d"),
                    injection_time=hhmmss(injection),
                    series_time=hhmmss(injection + uptake),
                    acquisition_delay_s=acquisition_delay,
                    anatomy=anatomy,
                    lesions=lesions,
                )
            )
    return plans
