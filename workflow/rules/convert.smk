rule convert:
    input:
        "results/raw/{study}",
    output:
        **{name: f"results/nifti/{{study}}/{name}.nii.gz" for name in names.NIFTI_NAMES},
    log:
        "results/logs/convert/{study}.log",
    benchmark:
        "results/benchmarks/convert/{study}.tsv"
    conda:
        "../../envs/io.yaml"
    params:
        settings=SETTINGS["convert"].to_dict(),
    script:
        "../scripts/convert.py"
