"""Entry script: list the studies of the configured source and assign splits by patient."""

from stepseg import logs, sources

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    sources.write_manifest(
        source=snakemake.params.source,
        settings=snakemake.params.settings,
        split=snakemake.params.split,
        out_path=snakemake.output[0],
    )
