"""Entry script: fetch (or generate) one study's DICOM series into results/raw/{study}."""

from stepseg import logs, sources

logs.setup(snakemake.log[0])
sources.fetch_study(
    source=snakemake.params.source,
    settings=snakemake.params.settings,
    manifest_path=snakemake.input[0],
    study=snakemake.wildcards.study,
    out_dir=snakemake.output[0],
)
