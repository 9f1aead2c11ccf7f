"""The embedded synthetic FDG-PET/CT cohort: analytic phantoms written as TCIA-like DICOM.

`plan` draws the cohort (patients, studies, lesions), `phantom` holds anatomy, uptake and
lesion shapes, `scanner` adds PET blur/noise and CT noise, `dicom_writer` writes CT, PET and
SEG series, and `source` implements the source interface used by `stepseg.sources`.
"""
