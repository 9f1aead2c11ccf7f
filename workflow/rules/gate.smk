# The lesion-presence gate (`gate.enabled`): a step-by-step model's predictions without the
# components its whole-crop channel calls lesion-free, the threshold chosen on the selection split
# (out-of-fold, cross-fitted by fold; else val) and applied to it and to test. Evaluated as the
# variant `<variant>_gated-seed<k>` beside the ungated one.
rule gate:
    input:
        selection=lambda wc: prediction_inputs(
            f"{wc.variant}-seed{wc.seed}", EVAL_SPLITS[0]
        ),
        test=lambda wc: prediction_inputs(f"{wc.variant}-seed{wc.seed}", "test"),
        seg=lambda wc: nifti_paths("SEG", EVAL_SPLITS[0]),
    output:
        predictions=directory("results/predictions/{variant}_gated-seed{seed}"),
        record="results/gate/{variant}-seed{seed}.json",
    log:
        "results/logs/gate/{variant}-seed{seed}.log",
    wildcard_constraints:
        variant=names.VARIANT_PATTERN,
        seed=r"[0-9]+",
    conda:
        "../../envs/report.yaml"
    params:
        selection=lambda wc: gate_selection(f"{wc.variant}-seed{wc.seed}"),
        test=lambda wc: list(
            zip(
                studies("test"),
                prediction_paths(f"{wc.variant}-seed{wc.seed}", "test"),
            )
        ),
    script:
        "../scripts/gate.py"
