"""Entry script: the SUV-threshold baseline prediction of one study."""

from stepseg import logs, threshold

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    threshold.predict_file(
        suv_path=snakemake.input.suv,
        out_path=snakemake.output[0],
        settings=snakemake.params.settings,
    )
