"""Entry script: convert one study's DICOM series to the autoPET NIfTI files."""

from stepseg import checks, convert, logs
from stepseg.settings import ConvertSettings

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    convert.convert_study(
        study=snakemake.wildcards.study,
        raw_dir=snakemake.input[0],
        outputs=dict(snakemake.output.items()),
        settings=ConvertSettings.from_mapping(snakemake.params.settings),
        ct_hu_range=checks.ct_hu_range(snakemake.config),
    )
