"""Entry script: train one model variant (resumable)."""

from stepseg import devices, logs, train
from stepseg.settings import TrainSettings

# each GPU job takes cards of its own (CUDA_VISIBLE_DEVICES); a no-op without GPUs
with (
    logs.job(snakemake.log[0], dict(snakemake.wildcards.items())),
    devices.claimed_gpus(snakemake.resources.gpu),
):
    train.train_variant(
        train_lmdb=snakemake.input.train,
        val_lmdb=snakemake.input.val,
        model_path=snakemake.output.model,
        log_csv=snakemake.output.log_csv,
        state_dir=snakemake.params.state_dir,
        settings=TrainSettings.from_mapping(snakemake.params.settings),
        threads=snakemake.threads,
    )
