"""Entry script: fetch (or generate) one study's DICOM series into results/raw/{study}."""

from stepseg import logs, sources

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    sources.fetch_study(
        source=snakemake.params.source,
        settings=snakemake.params.settings,
        manifest_path=snakemake.input[0],
        study=snakemake.wildcards.study,
        out_dir=snakemake.output[0],
    )
