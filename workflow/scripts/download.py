"""Entry script: fetch (or generate) one study's DICOM series into results/raw/{study}."""

from stepseg import logs, sources

# All the source's settings, from the config rather than params: the rule's params hold only what
# the study's files depend on (its rerun trigger), not how they are fetched (timeouts, retries).
source = snakemake.params.source
with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    sources.fetch_study(
        source=source,
        settings=snakemake.config["download"][source],
        manifest_path=snakemake.input[0],
        study=snakemake.wildcards.study,
        out_dir=snakemake.output[0],
    )
