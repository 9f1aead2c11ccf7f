rule report:
    input:
        metrics=expand(
            "results/metrics/{variant}/{eval_split}_per_study.csv",
            variant=all_variants(),
            eval_split=EVAL_SPLITS,
        ),
        train_logs=expand(
            "results/models/{trained}/train_log.csv", trained=trained_variants()
        ),
    output:
        table="results/report/results.csv",
        markdown="results/report/results.md",
    log:
        "results/logs/report/report.log",
    conda:
        "../../envs/report.yaml"
    params:
        settings=config["report"],
    script:
        "../scripts/report.py"
