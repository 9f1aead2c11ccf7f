"""Entry script: train one model variant (resumable)."""

from stepseg import logs, train

logs.setup(snakemake.log[0])
train.train_variant(
    train_lmdb=snakemake.input.train,
    val_lmdb=snakemake.input.val,
    model_path=snakemake.output.model,
    log_csv=snakemake.output.log_csv,
    state_dir=snakemake.params.state_dir,
    settings=snakemake.params.settings,
    threads=snakemake.threads,
)
