"""Entry script: sliding-window inference of one infer chunk of a split's studies, by one model
or a fold ensemble (mean probability)."""

from stepseg import checks, devices, infer, logs
from stepseg.settings import InferSettings

# each GPU job takes cards of its own (CUDA_VISIBLE_DEVICES); a no-op without GPUs
with (
    logs.job(snakemake.log[0], dict(snakemake.wildcards.items())),
    devices.claimed_gpus(snakemake.resources.gpu),
):
    infer.predict_split(
        model_paths=list(snakemake.input.models),
        studies=snakemake.params.studies,
        suv_paths=snakemake.input.suv,
        ctres_paths=snakemake.input.ctres,
        out_dir=snakemake.output[0],
        settings=InferSettings.from_mapping(snakemake.params.settings),
        threads=snakemake.threads,
        ct_hu_range=checks.ct_hu_range(snakemake.config),
    )
