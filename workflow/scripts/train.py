"""Entry script: train one model variant (resumable)."""

from stepseg import devices, logs, train

logs.setup(snakemake.log[0])
# each GPU job takes cards of its own (CUDA_VISIBLE_DEVICES); a no-op without GPUs
with devices.claimed_gpus(snakemake.resources.gpu):
    train.train_variant(
        train_lmdb=snakemake.input.train,
        val_lmdb=snakemake.input.val,
        model_path=snakemake.output.model,
        log_csv=snakemake.output.log_csv,
        state_dir=snakemake.params.state_dir,
        settings=snakemake.params.settings,
        threads=snakemake.threads,
    )
