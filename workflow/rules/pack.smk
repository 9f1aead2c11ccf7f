# One train and one val LMDB per fold (fold0 alone without cross-validation): `pack_studies`.
rule pack:
    input:
        suv=lambda wc: expand(
            "results/nifti/{study}/SUV.nii.gz",
            study=pack_studies(int(wc.fold), wc.part),
        ),
        ctres=lambda wc: expand(
            "results/nifti/{study}/CTres.nii.gz",
            study=pack_studies(int(wc.fold), wc.part),
        ),
        steps=lambda wc: expand(
            "results/targets/{study}/steps.nii.gz",
            study=pack_studies(int(wc.fold), wc.part),
        ),
    output:
        directory("results/lmdb/fold{fold}/{part}.lmdb"),
    log:
        "results/logs/pack/fold{fold}/{part}.log",
    benchmark:
        "results/benchmarks/pack/fold{fold}/{part}.tsv"
    wildcard_constraints:
        part="train|val",
    priority: pack_priority
    conda:
        "../../envs/torch.yaml"
    params:
        studies=lambda wc: pack_studies(int(wc.fold), wc.part),
        pack=SETTINGS["pack"].to_dict(),
        targets=SETTINGS["targets"].to_dict(),
        # a new LMDB layout in the code re-packs (the code trigger sees only the entry script)
        store_format=stepseg.LMDB_FORMAT_VERSION,
    script:
        "../scripts/pack.py"
