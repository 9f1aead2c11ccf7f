# One job per trained model `<variant>-seed<k>` and fold (fold0 alone without cross-validation).
rule train:
    input:
        train="results/lmdb/fold{fold}/train.lmdb",
        val="results/lmdb/fold{fold}/val.lmdb",
    output:
        model="results/models/{trained}/fold{fold}/model.pt",
        log_csv="results/models/{trained}/fold{fold}/train_log.csv",
    log:
        "results/logs/train/{trained}/fold{fold}.log",
    benchmark:
        "results/benchmarks/train/{trained}/fold{fold}.tsv"
    priority: train_priority
    conda:
        "../../envs/torch.yaml"
    threads: model_job_threads()
    resources:
        gpu=train_gpus,
    params:
        settings=variant_settings,
        state_dir=lambda wc: f"results/train_state/{wc.trained}/fold{wc.fold}",
    script:
        "../scripts/train.py"
