# Rerun triggers of the data steps: each job's params hold only what its output depends on.
# The operational settings of a source (download.tcia timeout_s, max_attempts, backoff_s,
# cache_dir, verify_md5) are not params: the entry scripts read them from the config
# (snakemake.config), so a change applies to the next fetch and reruns nothing.
checkpoint manifest:
    output:
        "results/manifest.tsv",
    log:
        "results/logs/manifest.log",
    conda:
        "../../envs/io.yaml"
    params:
        source=SOURCE,
        listing=stepseg.sources.listing_settings(SOURCE, config["download"][SOURCE]),
        split=config["split"],
        folds=FOLDS,
    script:
        "../scripts/manifest.py"


# The manifest is read for the study's row only: ancient() keeps a rewritten manifest (e.g. a new
# split) from re-downloading every study; a change of what the study holds still does (params).
rule download:
    input:
        ancient("results/manifest.tsv"),
    output:
        directory("results/raw/{study}"),
    log:
        "results/logs/download/{study}.log",
    benchmark:
        "results/benchmarks/download/{study}.tsv"
    retries: 3
    conda:
        "../../envs/io.yaml"
    resources:
        tcia_connections=1,
    params:
        source=SOURCE,
        study=study_identity,
    script:
        "../scripts/download.py"
