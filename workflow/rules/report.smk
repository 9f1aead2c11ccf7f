rule report:
    input:
        metrics=expand(
            "results/metrics/{variant}/{eval_split}_per_study.csv",
            variant=all_variants(),
            eval_split=EVAL_SPLITS,
        ),
        train_logs=list(train_logs().values()),
        gate_records=[gate_record(gated) for gated in GATED],
        suv=lambda wc: nifti_paths("SUV", "test"),
        seg=lambda wc: nifti_paths("SEG", "test"),
        pred=lambda wc: [
            path
            for variant in all_variants()
            for path in prediction_inputs(variant, "test")
        ],
    output:
        table=report(
            "results/report/results.csv",
            caption="../report/results_csv.rst",
            category="Results",
            subcategory="Tables",
        ),
        pairwise=report(
            "results/report/pairwise.csv",
            caption="../report/pairwise_csv.rst",
            category="Results",
            subcategory="Tables",
        ),
        markdown="results/report/results.md",
        html=report(
            "results/report/results.html",
            caption="../report/results_table.rst",
            category="Results",
            subcategory="Tables",
        ),
        distributions=report(
            "results/report/per_study_metrics.png",
            caption="../report/per_study_metrics.rst",
            category="Results",
            subcategory="Per-study metrics",
        ),
        learning_curves=report(
            "results/report/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Training",
            subcategory="Learning curves",
        ),
        curves=[
            report(
                f"results/report/training/{names.fold_model_name(trained, fold)}.png",
                caption="../report/training_curves.rst",
                category="Training",
                subcategory=names.parse_trained(trained)[0],
                labels={"model": names.fold_model_name(trained, fold)},
            )
            for trained in trained_variants()
            for fold in range(FOLDS)
        ],
        cases=[
            report(
                f"results/report/cases/{case}.png",
                caption="../report/test_case.rst",
                category="Test cases",
                subcategory="Coronal SUV MIP",
                labels={"case": case},
            )
            for case in SETTINGS["report"].mip_cases
        ],
    log:
        "results/logs/report/report.log",
    conda:
        "../../envs/report.yaml"
    params:
        # the keys of the input lists above, in their order
        variants=all_variants(),
        eval_splits=EVAL_SPLITS,
        # every fold model, in the order of the train_logs input
        fold_models=list(train_logs()),
        # the gated variants, in the order of the gate_records input
        gated=list(GATED),
        folds=FOLDS,
        test_studies=lambda wc: studies("test"),
        settings=SETTINGS["report"].to_dict(),
        data_source=config["download"]["source"],
        test_predictions=lambda wc: {
            variant: dict(zip(studies("test"), prediction_paths(variant, "test")))
            for variant in all_variants()
        },
    script:
        "../scripts/report.py"
