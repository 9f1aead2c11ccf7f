rule infer:
    input:
        model="results/models/{trained}/model.pt",
        suv="results/nifti/{study}/SUV.nii.gz",
        ctres="results/nifti/{study}/CTres.nii.gz",
    output:
        "results/predictions/{trained}/{study}.nii.gz",
    log:
        "results/logs/infer/{trained}/{study}.log",
    benchmark:
        "results/benchmarks/infer/{trained}/{study}.tsv"
    conda:
        "../../envs/torch.yaml"
    # one thread: a job is mostly start-up (torch, MONAI), so CPU-only machines run several side by
    # side; profiles/slurm sets a cluster job's CPUs
    threads: 1
    resources:
        gpu=1 if HAS_GPUS else 0,
    params:
        settings=config["infer"],
    script:
        "../scripts/infer.py"


rule infer_threshold:
    input:
        suv="results/nifti/{study}/SUV.nii.gz",
    output:
        "results/predictions/threshold/{study}.nii.gz",
    log:
        "results/logs/infer/threshold/{study}.log",
    conda:
        "../../envs/io.yaml"
    params:
        settings=config["threshold"],
    script:
        "../scripts/infer_threshold.py"
