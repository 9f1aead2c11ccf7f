"""Entry script: whole-body sliding-window inference of one study with one trained variant."""

from stepseg import checks, devices, infer, logs

# each GPU job takes cards of its own (CUDA_VISIBLE_DEVICES); a no-op without GPUs
with (
    logs.job(snakemake.log[0], dict(snakemake.wildcards.items())),
    devices.claimed_gpus(snakemake.resources.gpu),
):
    infer.predict_files(
        model_path=snakemake.input.model,
        suv_path=snakemake.input.suv,
        ctres_path=snakemake.input.ctres,
        out_path=snakemake.output[0],
        settings=snakemake.params.settings,
        threads=snakemake.threads,
        ct_hu_range=checks.ct_hu_range(snakemake.config),
    )
