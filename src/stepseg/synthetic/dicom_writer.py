"""Write a synthetic study as the DICOM a TCIA (NBIA) download of FDG-PET-CT-Lesions holds.

One folder per series, named `<SeriesNumber>.000000-<SeriesDescription>-<last 5 of UID>`, with
one file per slice (`1-001.dcm`, ...) for CT and PET and a single DICOM SEG (`1-1.dcm`) written
by highdicom that references the PET series. The attributes are those a converter of the real
collection relies on (geometry, rescale, PET units, decay correction, radiopharmaceutical);
values are written as DICOM strings first and every derived number uses the string's value, so
the truth files agree with what a reader of the tags computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

from stepseg.names import series_folder
from stepseg.synthetic.phantom import Grid
from stepseg.synthetic.plan import F18_HALF_LIFE_S, StudyPlan, hhmmss, seconds_of_day

MANUFACTURER = "stepseg synthetic"
MODEL = "Analytic PET/CT phantom"
SOFTWARE = "stepseg"
PET_MAX_STORED = 32767
BED_LENGTH_MM = 162.0
BED_OVERLAP = 0.25
BED_DURATION_S = 120
CT_SERIES = (2, "CT WB 5.0 B30f")
PET_SERIES = (4, "PET corr.")
SEG_SERIES = (300, "Segmentation")
SERIES_KIND = {"CT": "ct", "PT": "pet", "SEG": "seg"}  # names used in UIDs and manifest columns


@dataclass(frozen=True)
class StudyUIDs:
    """Deterministic UIDs: the same settings and study always give the same UIDs."""

    entropy: tuple[str, ...]

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=[*self.entropy, *(str(p) for p in parts)])


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit) with 9 significant digits."""
    text = f"{value:.9g}"
    if len(text) > 16:
        text = f"{value:.6e}"
    return text


def series_folders(uids: StudyUIDs) -> dict[str, str]:
    """The three series folders of a study, known before anything is generated."""
    return {
        f"{kind}_series": series_folder(number, description, uids.uid(f"{kind}-series"))
        for kind, (number, description) in (
            ("ct", CT_SERIES),
            ("pet", PET_SERIES),
            ("seg", SEG_SERIES),
        )
    }


def suv_factor(dose_bq: str, weight_kg: str, injection: str, series: str) -> float:
    """Bq/ml per SUV unit for activity decay-corrected to the series time (body-weight SUV)."""
    elapsed = seconds_of_day(series) - seconds_of_day(injection)
    decayed_dose = float(dose_bq) * 2.0 ** (-elapsed / F18_HALF_LIFE_S)
    return decayed_dose / (float(weight_kg) * 1000.0)


def _patient_study(plan: StudyPlan, uids: StudyUIDs) -> Dataset:
    ds = Dataset()
    ds.PatientName = f"Synthetic^{plan.patient_id}"
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = plan.birth_date
    ds.PatientSex = plan.sex
    age = int(plan.study_date[:4]) - int(plan.birth_date[:4])
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientWeight = _ds(plan.weight_kg)
    ds.PatientSize = _ds(plan.height_m)
    ds.StudyInstanceUID = uids.uid("study")
    ds.StudyDate = plan.study_date
    ds.StudyTime = hhmmss(seconds_of_day(plan.series_time) - 360)
    ds.StudyID = plan.study_id
    ds.AccessionNumber = f"{plan.patient_index:05d}{plan.visit:02d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PET-CT Ganzkoerper  primaer mit KM"
    ds.FrameOfReferenceUID = uids.uid("frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL
    ds.SoftwareVersions = SOFTWARE
    ds.DeviceSerialNumber = "0001"
    ds.PatientPosition = "HFS"
    return ds


def _series_template(
    plan: StudyPlan,
    uids: StudyUIDs,
    grid: Grid,
    sop_class: str,
    series: tuple[int, str],
    modality: str,
    series_time: str,
) -> Dataset:
    """Attributes shared by every slice of a series (patient, study, series, geometry)."""
    ds = _patient_study(plan, uids)
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.SeriesInstanceUID = uids.uid(f"{SERIES_KIND[modality]}-series")
    ds.SeriesNumber, ds.SeriesDescription = series
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = plan.study_date
    ds.SeriesTime = series_time
    ds.BodyPartExamined = "WHOLEBODY"
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[2])]
    ds.SliceThickness = _ds(grid.spacing[0])
    ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _slice(template: Dataset, sop_uid: str, grid: Grid, k: int, instance: int) -> Dataset:
    """A copy of the series template placed at slice k (k = 0 is the most inferior slice)."""
    ds = Dataset(dict(template))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = template.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    z = grid.origin[2] + k * grid.spacing[0]
    ds.ImagePositionPatient = [_ds(grid.origin[0]), _ds(grid.origin[1]), _ds(z)]
    ds.SliceLocation = _ds(z)
    return ds


def write_ct(
    out_dir: Path,
    plan: StudyPlan,
    uids: StudyUIDs,
    grid: Grid,
    hu: np.ndarray,
    padding_hu: int | None,
) -> str:
    """CT Image Storage, one file per slice, int16 stored = HU + 1024 (intercept -1024); with
    `padding_hu`, PixelPaddingValue names its stored value (the pixels `hu` pads with it)."""
    series_time = hhmmss(seconds_of_day(plan.series_time) - 240)
    template = _series_template(plan, uids, grid, CTImageStorage, CT_SERIES, "CT", series_time)
    template.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"]
    template.AcquisitionTime = template.ContentTime = series_time
    template.KVP = "120"
    template.ConvolutionKernel = "B30f"
    template.RescaleIntercept = "-1024"
    template.RescaleSlope = "1"
    template.RescaleType = "HU"
    template.WindowCenter = "40"
    template.WindowWidth = "400"
    if padding_hu is not None:
        template.PixelPaddingValue = padding_hu + 1024  # a stored value: before the rescale
    folder = series_folder(*CT_SERIES, template.SeriesInstanceUID)
    (out_dir / folder).mkdir()
    stored = hu.astype("<i2")  # one copy of the study's largest array, offset in place
    stored += np.int16(1024)
    nz = grid.shape[0]
    for instance, k in enumerate(range(nz - 1, -1, -1), start=1):
        ds = _slice(template, uids.uid("ct", k), grid, k, instance)
        ds.PixelData = stored[k].tobytes()
        ds.save_as(out_dir / folder / f"1-{instance:03d}.dcm", enforce_file_format=True)
    return folder


def write_pet(
    out_dir: Path, plan: StudyPlan, uids: StudyUIDs, grid: Grid, suv: np.ndarray
) -> tuple[str, list[Dataset], np.ndarray]:
    """PET Image Storage in Bq/ml (decay-corrected to SeriesTime), int16 with per-slice slope.

    Returns the folder, the datasets (for the SEG's references) and the SUV the files encode
    (stored value * slope / SUV factor, all from the written strings).
    """
    template = _series_template(
        plan,
        uids,
        grid,
        PositronEmissionTomographyImageStorage,
        PET_SERIES,
        "PT",
        plan.series_time,
    )
    dose, weight = _ds(plan.dose_bq), _ds(plan.weight_kg)
    factor = suv_factor(dose, weight, plan.injection_time, plan.series_time)
    template.ImageType = ["ORIGINAL", "PRIMARY"]
    template.SeriesType = ["WHOLE BODY", "IMAGE"]
    template.Units = "BQML"
    template.CountsSource = "EMISSION"
    template.DecayCorrection = "START"
    template.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
    template.RandomsCorrectionMethod = "DLYD"
    template.AttenuationCorrectionMethod = "measured,AC CT"
    template.ReconstructionMethod = "OSEM3D 4i8s"
    template.ActualFrameDuration = BED_DURATION_S * 1000
    # one static frame: the same FrameReferenceTime on every slice (dcm2niix reads differing
    # values as the frames of a dynamic scan and reorders the slices)
    template.FrameReferenceTime = "0"
    template.NumberOfSlices = grid.shape[0]
    template.CollimatorType = "NONE"
    del template.PatientPosition  # PET states it as the orientation code sequences below
    template.PatientOrientationCodeSequence = DicomSequence([_code(codes.SCT.Recumbent)])
    template.PatientOrientationCodeSequence[
        0
    ].PatientOrientationModifierCodeSequence = DicomSequence([_code(codes.SCT.Supine)])
    template.PatientGantryRelationshipCodeSequence = DicomSequence([_code(codes.SCT.Headfirst)])
    template.RadiopharmaceuticalInformationSequence = _radiopharmaceutical(plan, dose)
    template.RescaleIntercept = "0"
    folder = series_folder(*PET_SERIES, template.SeriesInstanceUID)
    (out_dir / folder).mkdir()
    nz = grid.shape[0]
    top_z = grid.origin[2] + (nz - 1) * grid.spacing[0]
    series_s = seconds_of_day(plan.series_time)
    encoded = np.empty(suv.shape, dtype=np.float32)
    datasets = []
    for instance, k in enumerate(range(nz - 1, -1, -1), start=1):
        ds = _slice(template, uids.uid("pet", k), grid, k, instance)
        # beds are acquired head to feet; a slice reports its bed's start as AcquisitionTime
        depth = top_z - (grid.origin[2] + k * grid.spacing[0])
        bed = int(depth // (BED_LENGTH_MM * (1 - BED_OVERLAP)))
        acquisition_s = series_s + plan.acquisition_delay_s + bed * BED_DURATION_S
        ds.AcquisitionTime = hhmmss(acquisition_s)
        ds.ContentTime = hhmmss(acquisition_s + BED_DURATION_S)
        ds.DecayFactor = _ds(2.0 ** ((acquisition_s - series_s) / F18_HALF_LIFE_S))
        ds.ImageIndex = instance
        activity = suv[k].astype(np.float64) * factor
        peak = float(activity.max())
        slope = _ds(peak / PET_MAX_STORED if peak > 0 else 1.0)
        stored = np.clip(np.rint(activity / float(slope)), 0, PET_MAX_STORED).astype("<i2")
        ds.RescaleSlope = slope
        ds.SmallestImagePixelValue = int(stored.min())
        ds.LargestImagePixelValue = int(stored.max())
        ds.PixelData = stored.tobytes()
        ds.save_as(out_dir / folder / f"1-{instance:03d}.dcm", enforce_file_format=True)
        encoded[k] = stored * float(slope) / factor
        datasets.append(ds)
    return folder, datasets, encoded


def _radiopharmaceutical(plan: StudyPlan, dose: str) -> DicomSequence:
    item = Dataset()
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadiopharmaceuticalStartTime = plan.injection_time + ".000000"
    item.RadiopharmaceuticalStartDateTime = plan.study_date + plan.injection_time + ".000000"
    item.RadionuclideTotalDose = dose
    item.RadionuclideHalfLife = _ds(F18_HALF_LIFE_S)
    item.RadionuclidePositronFraction = "0.9673"
    # the SNOMED-RT codes of the collection's scanners (deprecated since, still what they write)
    item.RadionuclideCodeSequence = DicomSequence([_code(Code("C-111A1", "SRT", "^18^Fluorine"))])
    item.RadiopharmaceuticalCodeSequence = DicomSequence(
        [_code(Code("C-B1031", "SRT", "Fluorodeoxyglucose F^18^"))]
    )
    return DicomSequence([item])


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _make_reproducible(seg: Dataset, plan: StudyPlan, uids: StudyUIDs) -> None:
    """Replace what highdicom takes from the clock or a random UID, so reruns are identical.

    The SEG is dated one hour after the PET series (annotation time), and its dimension
    organisation gets a UID derived from the study like every other UID.
    """
    created = hhmmss(seconds_of_day(plan.series_time) + 3600)
    seg.SeriesDate = seg.ContentDate = plan.study_date
    seg.SeriesTime = seg.ContentTime = created
    if "InstanceCreationDate" in seg:
        seg.InstanceCreationDate = plan.study_date
        seg.InstanceCreationTime = created
    for item in seg.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = plan.study_date + created
    organisation = uids.uid("seg-dimension-organization")
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(keyword, []):
            item.DimensionOrganizationUID = organisation


def _feet_to_head(seg: Dataset, mask: np.ndarray) -> None:
    """Reverse a SEG holding every PET slice (head to feet: highdicom sorts frames so) into the
    collection's order, feet to head: frame k is `mask[k]` (z = 0 inferior)."""
    if int(seg.NumberOfFrames) != len(mask):
        raise ValueError(f"SEG has {seg.NumberOfFrames} frames for {len(mask)} PET slices")
    seg.PerFrameFunctionalGroupsSequence = DicomSequence(
        list(seg.PerFrameFunctionalGroupsSequence)[::-1]
    )
    seg.PixelData = pack_bits(mask.astype(np.uint8), pad=True)


def write_seg(
    out_dir: Path,
    plan: StudyPlan,
    uids: StudyUIDs,
    pet_datasets: Sequence[Dataset],
    mask: np.ndarray,
    layout: str,
) -> str:
    """A BINARY DICOM SEG with one segment "lesion" on the PET slices.

    `pet_datasets` are in file order (head first) and `mask` is (z, y, x) with z = 0 inferior,
    so the frames are the mask reversed along z. `layout` "per_pet_slice": one frame per PET
    slice, empty ones included, feet to head: the collection's layout, which the official
    conversion (lab-midas/autoPET data_conversion/tcia2nifti.py) relies on, as it stacks the
    frames in file order onto the PET's inferior-to-superior axis. "lesion_frames": only frames
    with lesion, head to feet (highdicom's order); a lesion-free study still gets all (empty)
    frames, since highdicom cannot omit every frame.
    """
    frames = np.ascontiguousarray(mask[::-1].astype(np.uint8))
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    series_uid = uids.uid("seg-series")
    number, series_description = SEG_SERIES
    seg = hd.seg.Segmentation(
        source_images=list(pet_datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=number,
        sop_instance_uid=uids.uid("seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL,
        software_versions=SOFTWARE,
        device_serial_number="0001",
        series_description=series_description,
        content_label="LESIONS",
        omit_empty_frames=layout == "lesion_frames" and bool(frames.any()),
    )
    if layout == "per_pet_slice":
        _feet_to_head(seg, mask)
    _make_reproducible(seg, plan, uids)
    folder = series_folder(number, series_description, series_uid)
    (out_dir / folder).mkdir()
    seg.save_as(out_dir / folder / "1-1.dcm", enforce_file_format=True)
    return folder
