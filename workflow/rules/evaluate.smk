rule evaluate:
    input:
        seg=lambda wc: nifti_paths("SEG", wc.eval_split),
        suv=lambda wc: nifti_paths("SUV", wc.eval_split),
        pred=lambda wc: prediction_inputs(wc.variant, wc.eval_split),
    output:
        per_study="results/metrics/{variant}/{eval_split}_per_study.csv",
        summary="results/metrics/{variant}/{eval_split}_summary.csv",
    log:
        "results/logs/evaluate/{variant}/{eval_split}.log",
    conda:
        "../../envs/report.yaml"
    params:
        studies=lambda wc: studies(wc.eval_split),
        pred_paths=lambda wc: prediction_paths(wc.variant, wc.eval_split),
        settings=SETTINGS["evaluate"].to_dict(),
    script:
        "../scripts/evaluate.py"
