"""Entry script: whole-body sliding-window inference of one split's studies with one model."""

from stepseg import devices, infer, logs

logs.setup(snakemake.log[0])
# each GPU job takes cards of its own (CUDA_VISIBLE_DEVICES); a no-op without GPUs
with devices.claimed_gpus(snakemake.resources.gpu):
    infer.predict_split(
        model_path=snakemake.input.model,
        studies=snakemake.params.studies,
        suv_paths=snakemake.input.suv,
        ctres_paths=snakemake.input.ctres,
        out_dir=snakemake.output[0],
        settings=snakemake.params.settings,
        threads=snakemake.threads,
    )
