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
    threads: 2
    resources:
        gpu=1,
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
