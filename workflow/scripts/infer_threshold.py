"""Entry script: the SUV-threshold baseline prediction of one study."""

from stepseg import logs, threshold
from stepseg.settings import ThresholdSettings

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    threshold.predict_file(
        study=snakemake.wildcards.study,
        suv_path=snakemake.input.suv,
        out_path=snakemake.output[0],
        settings=ThresholdSettings.from_mapping(snakemake.params.settings),
    )
