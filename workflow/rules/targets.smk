rule targets:
    input:
        seg="results/nifti/{study}/SEG.nii.gz",
        suv="results/nifti/{study}/SUV.nii.gz",
        ctres="results/nifti/{study}/CTres.nii.gz",
    output:
        steps="results/targets/{study}/steps.nii.gz",
        qc=report(
            "results/targets/{study}/qc.png",
            caption="../report/targets_qc.rst",
            category="Targets",
            subcategory="{study}",
        ),
    log:
        "results/logs/targets/{study}.log",
    benchmark:
        "results/benchmarks/targets/{study}.tsv"
    conda:
        # numpy, scipy, nibabel and matplotlib: the stage imports no torch (tests/test_targets.py)
        "../../envs/io.yaml"
    params:
        targets=SETTINGS["targets"].to_dict(),
    script:
        "../scripts/targets.py"
