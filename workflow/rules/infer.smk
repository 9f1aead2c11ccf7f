rule infer:
    input:
        models=infer_models,
        suv=lambda wc: nifti_paths("SUV", wc.eval_split, wc.chunk),
        ctres=lambda wc: nifti_paths("CTres", wc.eval_split, wc.chunk),
    output:
        directory("results/predictions/{trained}/{eval_split}/{chunk}"),
    log:
        "results/logs/infer/{trained}/{eval_split}/{chunk}.log",
    benchmark:
        "results/benchmarks/infer/{trained}/{eval_split}/{chunk}.tsv"
    wildcard_constraints:
        chunk=r"(fold(0|[1-9][0-9]*)-)?chunk-(0|[1-9][0-9]*)",
    conda:
        "../../envs/torch.yaml"
    # one job per model and chunk of at most `infer.studies_per_job` studies (`infer_chunks`):
    # starting torch and MONAI and loading the model cost more than predicting a study on a CPU,
    # and a cluster spreads the chunks over its nodes; profiles/slurm sets a cluster job's CPUs.
    # A test chunk's models are every fold's (their mean probability is thresholded), an
    # out-of-fold chunk's the one fold model that did not train on its studies
    threads: model_job_threads()
    resources:
        gpu=infer_gpus,
    params:
        studies=lambda wc: infer_chunk(wc.eval_split, wc.chunk)[0],
        settings=SETTINGS["infer"].to_dict(),
    script:
        "../scripts/infer.py"


rule infer_threshold:
    input:
        suv="results/nifti/{study}/SUV.nii.gz",
    output:
        "results/predictions/threshold/{eval_split}/{study}.nii.gz",
    log:
        "results/logs/infer/threshold/{eval_split}/{study}.log",
    conda:
        "../../envs/io.yaml"
    params:
        settings=SETTINGS["threshold"].to_dict(),
    script:
        "../scripts/infer_threshold.py"
