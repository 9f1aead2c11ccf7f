"""stepseg: step-by-step whole-body FDG-PET/CT lesion segmentation (autoPET 2022)."""

__version__ = "0.1.0"

# The LMDB layout of `stepseg.tilestore` (2: study metadata gained the hot voxel index; 3: one
# value per tile position; 4: every value behind a CRC32; 5: `__meta__` holds each study's content
# digest; 6: each study's lesion components, for per-component crop centres). Here, not in that
# module, so that the workflow can hand it to the pack rule as a parameter without importing
# numpy and lmdb: a new layout re-packs by itself.
LMDB_FORMAT_VERSION = 6
