"""DICOM side of the conversion: series found by their tags, slices placed in space, the SUV
factor read from the PET header and the lesion SEG decoded onto the PET slices.

Every file is parsed once (`find_series`): large values such as the pixel data are deferred and
read only when a volume is assembled, so files of series that are not converted cost a header
parse and nothing more.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage
from pydicom.valuerep import DA, DT, TM

from stepseg.errors import StudyError

log = logging.getLogger(__name__)

# Values larger than this stay on disk until accessed (in practice: the pixel data).
DEFER_SIZE = "1 KB"
# DICOM positions are written with a few decimals; anything closer than this is the same place.
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4
# slice gaps may differ by this fraction of the mean gap (rounding in ImagePositionPatient)
SPACING_TOLERANCE = 0.01
# DICOM patient coordinates are LPS, NIfTI world coordinates are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# An injection more than this many half-lives before the reference time left less than 0.1 % of
# the dose: no PET is acquired then, so the tags (or a time-of-day guess across midnight) are wrong.
MAX_HALF_LIVES_ELAPSED = 10.0
# tags every slice of a series must share: slices of another modality or another frame of
# reference (patient coordinate system) cannot be placed by their positions
SERIES_KEYWORDS = ("Modality", "FrameOfReferenceUID")
RADIOPHARMACEUTICAL_KEYWORDS = (
    "RadionuclideTotalDose",
    "RadionuclideHalfLife",
    "RadiopharmaceuticalStartTime",
    "RadiopharmaceuticalStartDateTime",
)
REFERENCE_TIME_TAGS = {
    "series": ("SeriesDate", "SeriesTime"),
    "acquisition": ("AcquisitionDate", "AcquisitionTime"),
}


@dataclass(frozen=True)
class Series:
    """All instances of one SeriesInstanceUID, headers only (pixel data deferred)."""

    uid: str
    modality: str
    headers: tuple[Dataset, ...]

    @property
    def first_path(self) -> Path:
        return Path(self.headers[0].filename)


@dataclass(frozen=True)
class Stack:
    """A series' slices sorted along the slice normal, and the RAS affine of the (z, y, x) array
    they form (x = column index, y = row index, z = position in `headers`)."""

    headers: tuple[Dataset, ...]
    affine: np.ndarray

    @property
    def first_path(self) -> Path:
        return Path(self.headers[0].filename)

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.headers[0]
        return (len(self.headers), int(first.Rows), int(first.Columns))


def read_header(path: Path, study: str | None, **kwargs: Any) -> Dataset | None:
    """`pydicom.dcmread(path, **kwargs)`, or None for a file without the DICOM preamble (not
    DICOM); a DICOM file that cannot be parsed is an error naming the file and `study` (None
    while a tree is listed, before its studies are known), never skipped."""
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types for damaged files
        message = f"corrupt DICOM file ({type(exc).__name__}: {exc})"
        if study is None:
            raise ValueError(f"{path}: {message}") from exc
        raise StudyError(study, message, path) from exc


def find_series(study: str, raw_dir: str | Path) -> list[Series]:
    """Group every DICOM file under `raw_dir` by SeriesInstanceUID, whatever the folder layout.

    Files without the DICOM preamble (e.g. the synthetic cohort's truth NIfTI files) and DICOMDIR
    indexes are ignored; a file that has the preamble but cannot be parsed is an error, never
    skipped.
    """
    groups: dict[str, list[Dataset]] = defaultdict(list)
    ignored = 0
    for path in sorted(p for p in Path(raw_dir).rglob("*") if p.is_file()):
        header = read_header(path, study, defer_size=DEFER_SIZE)
        if header is None:
            ignored += 1
            continue
        if header.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            ignored += 1  # a DICOMDIR index (CDs, PACS exports) holds no image
            continue
        uid, modality = header.get("SeriesInstanceUID"), header.get("Modality")
        if not uid or not modality:
            raise StudyError(
                study, "corrupt DICOM file (truncated?): no SeriesInstanceUID or Modality", path
            )
        groups[str(uid)].append(header)
    log.info("study %s: %d series, %d other files ignored", study, len(groups), ignored)
    return [Series(uid, str(h[0].Modality), tuple(h)) for uid, h in groups.items()]


def select_series(
    study: str, series: Sequence[Series], modality: str, raw_dir: str | Path
) -> Series:
    """The one series of `modality`; none or several is an error, since guessing is unsafe."""
    matches = [s for s in series if s.modality == modality]
    if len(matches) != 1:
        found = ", ".join(
            f"{s.uid} ({len(s.headers)} files, {s.first_path.parent})" for s in matches
        )
        raise StudyError(
            study, f"expected exactly one {modality} series, found {len(matches)}: {found}", raw_dir
        )
    return matches[0]


def _vector(study: str, header: Dataset, keyword: str, length: int) -> np.ndarray:
    value = header.get(keyword)
    if value is None or len(value) != length:
        raise StudyError(study, f"missing or malformed {keyword}", header.filename)
    return np.asarray([float(v) for v in value], dtype=np.float64)


def stack_slices(study: str, series: Series) -> Stack:
    """Sort a series' slices by position along the normal of ImageOrientationPatient (never by
    file name or InstanceNumber) and build the RAS affine from IOP, IPP and PixelSpacing.

    Refuses what would make a wrong volume: mixed orientations or sizes, duplicate positions,
    missing slices (uneven gaps) and positions that do not lie on one line.
    """
    headers = series.headers
    first = headers[0]
    if len(headers) < 2:
        raise StudyError(study, f"{series.modality} series has a single slice", first.filename)
    orientation = _vector(study, first, "ImageOrientationPatient", 6)
    spacing = _vector(study, first, "PixelSpacing", 2)  # (between rows, between columns)
    for header in headers[1:]:
        same_plane = np.allclose(
            _vector(study, header, "ImageOrientationPatient", 6),
            orientation,
            atol=ORIENTATION_TOLERANCE,
        )
        same_size = (header.Rows, header.Columns) == (first.Rows, first.Columns)
        same_spacing = np.allclose(_vector(study, header, "PixelSpacing", 2), spacing)
        if not (same_plane and same_size and same_spacing):
            raise StudyError(
                study,
                f"{series.modality} slice orientation, size or pixel spacing differs "
                f"from {first.filename}",
                header.filename,
            )
        for keyword in SERIES_KEYWORDS:
            if header.get(keyword) != first.get(keyword):
                raise StudyError(
                    study,
                    f"{series.modality} slice {keyword} is {header.get(keyword)!r}, but "
                    f"{first.get(keyword)!r} in {first.filename}: a mixed series is refused",
                    header.filename,
                )
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions = np.stack([_vector(study, h, "ImagePositionPatient", 3) for h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if gaps.min() < POSITION_TOLERANCE_MM:
        duplicate = headers[order[int(np.argmin(gaps)) + 1]]
        raise StudyError(
            study, f"two {series.modality} slices share one position", duplicate.filename
        )
    if np.abs(gaps - gaps.mean()).max() > SPACING_TOLERANCE * gaps.mean():
        raise StudyError(
            study,
            f"{series.modality} slice gaps range {gaps.min():.3f}-{gaps.max():.3f} mm "
            "(missing slices?)",
            first.filename,
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    if np.abs(positions - expected).max() > max(
        POSITION_TOLERANCE_MM, SPACING_TOLERANCE * np.linalg.norm(step)
    ):
        raise StudyError(study, f"{series.modality} slices are not on one line", first.filename)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * spacing[1]
    affine_lps[:3, 1] = column_direction * spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return Stack(headers=tuple(headers[i] for i in order), affine=LPS_TO_RAS @ affine_lps)


def read_volume(study: str, stack: Stack, padding_as: float | None = None) -> np.ndarray:
    """The stack's pixel data in modality units (HU, Bq/ml) as float32 (z, y, x).

    RescaleSlope/Intercept are applied per slice: PET vendors scale every slice separately.
    Every slice must state them (`_rescale`) and hold one frame of Rows x Columns. With
    `padding_as`, the pixels a slice marks as padding (`_padding`: outside a CT's reconstruction
    circle) take that value instead of their rescaled one.
    """
    slices = []
    padded = []
    rows_columns = (int(stack.headers[0].Rows), int(stack.headers[0].Columns))
    for k, header in enumerate(stack.headers):
        try:
            pixels = header.pixel_array
        except Exception as exc:  # truncated or undecodable pixel data
            raise StudyError(study, f"cannot decode pixel data ({exc})", header.filename) from exc
        if pixels.shape != rows_columns:
            raise StudyError(
                study,
                f"pixel data of shape {pixels.shape}, expected one frame of {rows_columns}",
                header.filename,
            )
        slices.append(pixels)
        mask = None if padding_as is None else _padding(study, header, pixels)
        if mask is not None:
            padded.append((k, mask))
    slope, intercept = np.array([_rescale(study, h) for h in stack.headers], np.float32).T
    volume = np.stack(slices).astype(np.float32)
    volume *= slope[:, None, None]
    volume += intercept[:, None, None]
    for k, mask in padded:
        volume[k][mask] = padding_as
    return volume


def _padding(study: str, header: Dataset, pixels: np.ndarray) -> np.ndarray | None:
    """The pixels of one slice that PixelPaddingValue marks as padding (None without the tag):
    those equal to it, or with PixelPaddingRangeLimit those between the two (inclusive, either
    may be the lower).

    Both are stored values, compared before the rescale (PS3.3 C.7.5.1.1.2). A value written
    with the other signedness than the pixels (US 63536 for signed pixels) means the same bits.
    """
    values = [header.get(k) for k in ("PixelPaddingValue", "PixelPaddingRangeLimit")]
    if values[0] is None:
        return None
    bits = 8 * pixels.dtype.itemsize
    try:
        stored = [
            np.array(int(v) % 2**bits, f"u{pixels.dtype.itemsize}").view(pixels.dtype)
            for v in values
            if v is not None
        ]
    except (TypeError, ValueError) as exc:
        message = (
            f"PixelPaddingValue {values[0]} and PixelPaddingRangeLimit {values[1]}: "
            "expected one integer each"
        )
        raise StudyError(study, message, header.filename) from exc
    return (pixels >= min(stored)) & (pixels <= max(stored))


def _rescale(study: str, header: Dataset) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of one slice.

    Both are Type 1 in the CT and PET image modules: a slice without them would be read in raw
    stored values (for CT typically 1024 HU off). A slope that is not positive and finite, a PET
    intercept other than 0 (the standard requires 0) and a CT RescaleType other than HU mean
    values that are not HU or Bq/ml.
    """
    modality = header.get("Modality")
    values = []
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = header.get(keyword)
        if value is None or value == "":
            raise StudyError(study, f"{modality} slice lacks {keyword}", header.filename)
        values.append(float(value))
    slope, intercept = values
    if not (np.isfinite(slope) and slope > 0 and np.isfinite(intercept)):
        raise StudyError(
            study,
            f"{modality} slice has RescaleSlope {slope:g} and RescaleIntercept {intercept:g}; "
            "the slope must be positive and both finite",
            header.filename,
        )
    if modality == "PT" and intercept != 0:
        message = f"PET RescaleIntercept is {intercept:g}; the standard requires 0"
        raise StudyError(study, message, header.filename)
    rescale_type = header.get("RescaleType")
    if modality == "CT" and rescale_type not in (None, "", "HU"):
        raise StudyError(
            study, f"CT RescaleType is {rescale_type!r}; only HU is supported", header.filename
        )
    return slope, intercept


def _datetime(header: Dataset, date_keyword: str, time_keyword: str) -> datetime | None:
    """Date and time tags as one naive datetime; a missing date counts as day 0."""
    time = header.get(time_keyword)
    if not time:
        return None
    date = header.get(date_keyword)
    day = DA(date) if date else datetime(1900, 1, 1).date()
    return datetime.combine(day, TM(time))


def _timezone(study: str, header: Dataset) -> timezone | None:
    """TimezoneOffsetFromUTC ("+HHMM" / "-HHMM") as a timezone; None when the tag is absent."""
    value = str(header.get("TimezoneOffsetFromUTC") or "").strip()
    if not value:
        return None
    if len(value) != 5 or value[0] not in "+-" or not value[1:].isdigit():
        raise StudyError(study, f"malformed TimezoneOffsetFromUTC {value!r}", header.filename)
    sign = -1 if value[0] == "-" else 1
    return timezone(sign * timedelta(hours=int(value[1:3]), minutes=int(value[3:])))


def _local_datetime(value: str, local: timezone | None) -> datetime:
    """A DT value as a naive datetime in the series' local time.

    DA and TM values (SeriesDate/Time, AcquisitionDate/Time) carry no offset: they are local time
    at TimezoneOffsetFromUTC. A DT with its own offset (&ZZXX) is moved to that offset first; where
    the series states no offset, the DT's own offset is taken as the local one.
    """
    moment = DT(value)
    if moment.tzinfo is not None and local is not None:
        moment = moment.astimezone(local)
    return moment.replace(tzinfo=None)


def suv_factor(study: str, pet: Stack, reference_time: str) -> float:
    """Body-weight SUV per Bq/ml: weight [g] / injected dose decayed to the reference time [Bq].

    `reference_time` names the DICOM time that the decay correction refers to: "series"
    (SeriesDate/SeriesTime) or "acquisition" (the earliest AcquisitionDate/AcquisitionTime of the
    series). See config/README.md for why the default is what it is. Only Units BQML with
    DecayCorrection START are accepted: any other unit or correction would need a different
    formula, and a silently wrong SUV is worse than none.
    """
    first = pet.headers[0]
    path = first.filename
    units = first.get("Units")
    if units != "BQML":
        raise StudyError(study, f"PET Units is {units!r}; only BQML can be converted to SUV", path)
    decay = first.get("DecayCorrection")
    if decay != "START":
        raise StudyError(
            study, f"PET DecayCorrection is {decay!r}; only START can be converted to SUV", path
        )
    weight_kg = float(first.get("PatientWeight") or 0.0)
    if weight_kg <= 0:
        raise StudyError(study, "PET header has no PatientWeight", path)
    needed = "RadionuclideTotalDose, RadionuclideHalfLife and RadiopharmaceuticalStart(Date)Time"
    try:
        info = first.RadiopharmaceuticalInformationSequence[0]
        dose_bq = float(info.RadionuclideTotalDose)
        half_life_s = float(info.RadionuclideHalfLife)
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise StudyError(study, f"PET header lacks {needed}", path) from exc
    _check_same_suv_tags(study, pet)
    date_keyword, time_keyword = REFERENCE_TIME_TAGS[reference_time]
    candidates = [_datetime(h, date_keyword, time_keyword) for h in pet.headers]
    if any(c is None for c in candidates):
        raise StudyError(study, f"PET header lacks {time_keyword}", path)
    reference = min(candidates)
    start_datetime = info.get("RadiopharmaceuticalStartDateTime")
    start_time = info.get("RadiopharmaceuticalStartTime")
    local = _timezone(study, first)
    try:
        if start_datetime and all(h.get(date_keyword) for h in pet.headers):
            injection = _local_datetime(start_datetime, local)
        elif start_time or start_datetime:  # time of day only: the scan is within a day
            time_of_day = (
                TM(start_time) if start_time else _local_datetime(start_datetime, local).time()
            )
            injection = datetime.combine(reference.date(), time_of_day)
            if injection > reference:  # injected before midnight, scanned after
                injection -= timedelta(days=1)
        else:
            raise StudyError(study, f"PET header lacks {needed}", path)
    except ValueError as exc:
        raise StudyError(
            study, f"malformed RadiopharmaceuticalStart(Date)Time ({exc})", path
        ) from exc
    elapsed_s = (reference - injection).total_seconds()
    if dose_bq <= 0 or half_life_s <= 0:
        raise StudyError(
            study, f"implausible SUV tags: dose {dose_bq} Bq, half-life {half_life_s} s", path
        )
    if elapsed_s < 0:
        raise StudyError(
            study,
            f"implausible SUV tags: injection at {injection} is {-elapsed_s:.0f} s after "
            f"{time_keyword} {reference}",
            path,
        )
    if elapsed_s > MAX_HALF_LIVES_ELAPSED * half_life_s:
        raise StudyError(
            study,
            f"implausible SUV tags: {elapsed_s:.0f} s from injection at {injection} to "
            f"{time_keyword} {reference} is more than {MAX_HALF_LIVES_ELAPSED:g} half-lives "
            f"({half_life_s} s)",
            path,
        )
    decayed_dose_bq = dose_bq * 0.5 ** (elapsed_s / half_life_s)
    return weight_kg * 1000.0 / decayed_dose_bq


def _suv_tags(header: Dataset) -> dict[str, str | None]:
    """The tags of one PET slice that enter its SUV factor, as comparable strings."""
    tags: dict[str, str | None] = {
        keyword: _plain(header.get(keyword))
        for keyword in ("Units", "DecayCorrection", "PatientWeight")
    }
    sequence = header.get("RadiopharmaceuticalInformationSequence") or [Dataset()]
    for keyword in RADIOPHARMACEUTICAL_KEYWORDS:
        tags[keyword] = _plain(sequence[0].get(keyword))
    return tags


def _plain(value: object) -> str | None:
    """A tag value for comparison: numbers by value (DS "70" equals "70.0"), others as text."""
    if value is None or value == "":
        return None
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def _check_same_suv_tags(study: str, pet: Stack) -> None:
    """Refuse a PET series whose slices differ in Units, DecayCorrection, PatientWeight or the
    radiopharmaceutical tags: the SUV factor is computed once for the series, so a slice in
    other units, without the dose tags or with another dose would be scaled silently wrong.
    (Acquisition times may differ per slice; the earliest is the reference.)"""
    first = pet.headers[0]
    expected = _suv_tags(first)
    for header in pet.headers[1:]:
        for keyword, value in _suv_tags(header).items():
            if value != expected[keyword]:
                raise StudyError(
                    study,
                    f"PET {keyword} is {value or 'missing'} in this slice but "
                    f"{expected[keyword] or 'missing'} in {first.filename}: a series mixing "
                    "them cannot be converted to SUV",
                    header.filename,
                )


def decode_seg(study: str, seg: Series, pet: Stack) -> np.ndarray:
    """The SEG as a uint8 0/1 (z, y, x) mask on the PET grid (union of all segments).

    Frames are placed by the PET instance they reference, and each frame's plane position must
    agree with that instance's position, so a SEG drawn on another series (or shifted) is refused
    instead of being misplaced.
    """
    if len(seg.headers) != 1:
        raise StudyError(study, f"expected one SEG file, found {len(seg.headers)}", seg.first_path)
    path = seg.first_path
    try:
        segmentation = hd.seg.Segmentation.from_dataset(seg.headers[0], copy=False)
    except Exception as exc:
        raise StudyError(study, f"cannot read DICOM SEG ({exc})", path) from exc
    pet_series_uid = str(pet.headers[0].SeriesInstanceUID)
    referenced = {str(series_uid) for _, series_uid, _ in segmentation.get_source_image_uids()}
    if referenced != {pet_series_uid}:
        raise StudyError(
            study,
            f"SEG references series {sorted(referenced)}, not the PET series {pet_series_uid}",
            path,
        )
    _check_frame_positions(study, seg.headers[0], pet, path)
    try:
        pixels = segmentation.get_pixels_by_source_instance(
            [str(h.SOPInstanceUID) for h in pet.headers],
            ignore_spatial_locations=True,  # positions are checked above instead
            assert_missing_frames_are_empty=True,  # SEGs omit empty frames
            skip_overlap_checks=True,
            dtype=np.uint8,
        )
    except Exception as exc:
        raise StudyError(study, f"cannot decode DICOM SEG frames ({exc})", path) from exc
    if pixels.shape[:3] != pet.shape:
        raise StudyError(
            study, f"SEG frames {pixels.shape[:3]} do not match the PET grid {pet.shape}", path
        )
    return pixels.any(axis=-1).astype(np.uint8)


def _check_frame_positions(study: str, seg: Dataset, pet: Stack, path: Path) -> None:
    """SEG frames must share the PET orientation, and each frame that states a plane position
    must sit on the PET slice it references; otherwise placing frames by reference is wrong."""
    pet_orientation = _vector(study, pet.headers[0], "ImageOrientationPatient", 6)
    pet_positions = {
        str(h.SOPInstanceUID): _vector(study, h, "ImagePositionPatient", 3) for h in pet.headers
    }
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for number, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        orientations = frame.get("PlaneOrientationSequence") or shared.get(
            "PlaneOrientationSequence"
        )
        if orientations:
            orientation = np.asarray([float(v) for v in orientations[0].ImageOrientationPatient])
            if not np.allclose(orientation, pet_orientation, atol=ORIENTATION_TOLERANCE):
                raise StudyError(
                    study,
                    f"SEG frame {number} orientation {orientation.tolist()} differs from the "
                    f"PET orientation {pet_orientation.tolist()}",
                    path,
                )
        planes = frame.get("PlanePositionSequence")
        derivations = frame.get("DerivationImageSequence")
        if not planes or not derivations:
            continue
        position = np.asarray([float(v) for v in planes[0].ImagePositionPatient])
        for source in derivations[0].SourceImageSequence:
            expected = pet_positions.get(str(source.ReferencedSOPInstanceUID))
            if expected is not None and np.abs(position - expected).max() > POSITION_TOLERANCE_MM:
                raise StudyError(
                    study,
                    f"SEG frame {number} lies at {position.tolist()} but its PET slice "
                    f"{source.ReferencedSOPInstanceUID} lies at {expected.tolist()}",
                    path,
                )
