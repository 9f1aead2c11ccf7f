"""Entry script: link one autoPET release study's NIfTI files in place of the DICOM conversion."""

from stepseg import logs
from stepseg.sources import local

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    local.link_nifti_study(
        study=snakemake.wildcards.study,
        raw_dir=snakemake.input[0],
        outputs=dict(snakemake.output.items()),
    )
