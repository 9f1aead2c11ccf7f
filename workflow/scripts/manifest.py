"""Entry script: list the studies of the configured source and assign splits by patient."""

from stepseg import logs, sources

# All the source's settings, from the config: the rule's params hold only the listing settings
# (its rerun trigger), not the operational ones (timeouts, retries) the listing also uses.
source = snakemake.params.source
with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    sources.write_manifest(
        source=source,
        settings=snakemake.config["download"][source],
        split=snakemake.params.split,
        out_path=snakemake.output[0],
        folds=snakemake.params.folds,
    )
