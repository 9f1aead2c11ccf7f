checkpoint manifest:
    output:
        "results/manifest.tsv",
    log:
        "results/logs/manifest.log",
    conda:
        "../../envs/io.yaml"
    params:
        source=SOURCE,
        settings=config["download"][SOURCE],
        split=config["split"],
    script:
        "../scripts/manifest.py"


# The manifest is read for the study's row only: ancient() keeps a rewritten manifest (e.g. a new
# split) from re-downloading every study; a change of the source settings still does (params).
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
        settings=config["download"][SOURCE],
    script:
        "../scripts/download.py"
