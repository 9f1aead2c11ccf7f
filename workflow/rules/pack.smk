rule pack:
    input:
        suv=lambda wc: nifti_paths("SUV", wc.split),
        ctres=lambda wc: nifti_paths("CTres", wc.split),
        steps=lambda wc: expand(
            "results/targets/{study}/steps.nii.gz", study=studies(wc.split)
        ),
    output:
        directory("results/lmdb/{split}.lmdb"),
    log:
        "results/logs/pack/{split}.log",
    benchmark:
        "results/benchmarks/pack/{split}.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        studies=lambda wc: studies(wc.split),
        pack=SETTINGS["pack"].to_dict(),
        targets=SETTINGS["targets"].to_dict(),
        # a new LMDB layout in the code re-packs (the code trigger sees only the entry script)
        store_format=stepseg.LMDB_FORMAT_VERSION,
    script:
        "../scripts/pack.py"
