rule convert:
    input:
        "results/raw/{study}",
    output:
        **{
            name: f"results/nifti/{{study}}/{name}.nii.gz"
            for name in ["CT", "PET", "SUV", "CTres", "SEG"]
        },
    log:
        "results/logs/convert/{study}.log",
    benchmark:
        "results/benchmarks/convert/{study}.tsv"
    conda:
        "../../envs/io.yaml"
    params:
        settings=config["convert"],
    script:
        "../scripts/convert.py"
