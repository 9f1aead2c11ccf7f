rule infer:
    input:
        model="results/models/{trained}/model.pt",
        suv=lambda wc: nifti_paths("SUV", wc.eval_split),
        ctres=lambda wc: nifti_paths("CTres", wc.eval_split),
    output:
        directory("results/predictions/{trained}/{eval_split}"),
    log:
        "results/logs/infer/{trained}/{eval_split}.log",
    benchmark:
        "results/benchmarks/infer/{trained}/{eval_split}.tsv"
    conda:
        "../../envs/torch.yaml"
    # one job per model and split: starting torch and MONAI and loading the model cost more
    # than predicting a study on a CPU; profiles/slurm sets a cluster job's CPUs
    threads: model_job_threads()
    resources:
        gpu=infer_gpus,
    params:
        studies=lambda wc: studies(wc.eval_split),
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
