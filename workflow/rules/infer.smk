rule infer:
    input:
        model="results/models/{trained}/model.pt",
        suv=lambda wc: nifti_paths("SUV", wc.eval_split, wc.chunk),
        ctres=lambda wc: nifti_paths("CTres", wc.eval_split, wc.chunk),
    output:
        directory("results/predictions/{trained}/{eval_split}/chunk-{chunk}"),
    log:
        "results/logs/infer/{trained}/{eval_split}/chunk-{chunk}.log",
    benchmark:
        "results/benchmarks/infer/{trained}/{eval_split}/chunk-{chunk}.tsv"
    wildcard_constraints:
        chunk=r"0|[1-9][0-9]*",
    conda:
        "../../envs/torch.yaml"
    # one job per model and chunk of at most `infer.studies_per_job` studies (`infer_chunks`):
    # starting torch and MONAI and loading the model cost more than predicting a study on a CPU,
    # and a cluster spreads the chunks over its nodes; profiles/slurm sets a cluster job's CPUs
    threads: model_job_threads()
    resources:
        gpu=infer_gpus,
    params:
        studies=lambda wc: infer_chunk(wc.eval_split, wc.chunk),
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
