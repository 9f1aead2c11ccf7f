rule train:
    input:
        train="results/lmdb/train.lmdb",
        val="results/lmdb/val.lmdb",
    output:
        model="results/models/{trained}/model.pt",
        log_csv="results/models/{trained}/train_log.csv",
    log:
        "results/logs/train/{trained}.log",
    benchmark:
        "results/benchmarks/train/{trained}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_job_threads()
    resources:
        gpu=train_gpus,
    params:
        settings=variant_settings,
        state_dir=lambda wc: f"results/train_state/{wc.trained}",
    script:
        "../scripts/train.py"
