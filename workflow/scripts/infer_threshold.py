"""Entry script: the SUV-threshold baseline prediction of one study."""

from stepseg import logs, threshold

logs.setup(snakemake.log[0])
threshold.predict_file(
    suv_path=snakemake.input.suv,
    out_path=snakemake.output[0],
    settings=snakemake.params.settings,
)
