"""stepseg: step-by-step whole-body FDG-PET/CT lesion segmentation (autoPET 2022)."""

__version__ = "0.1.0"
