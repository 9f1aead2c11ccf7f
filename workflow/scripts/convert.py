"""Entry script: convert one study's DICOM series to the autoPET NIfTI files."""

from stepseg import checks, convert, logs

logs.setup(snakemake.log[0])
convert.convert_study(
    study=snakemake.wildcards.study,
    raw_dir=snakemake.input[0],
    outputs=dict(snakemake.output.items()),
    settings=snakemake.params.settings,
    ct_hu_range=checks.ct_hu_range(snakemake.config),
)
