# download.source: nifti_dir -- the autoPET NIfTI release is already converted: `link_nifti`
# replaces `convert` and links the validated release files (results/raw/{study}/*.nii.gz, symlinks
# made by the download step) to the same outputs convert would write.
if SOURCE == "nifti_dir":

    ruleorder: link_nifti > convert

    rule link_nifti:
        input:
            "results/raw/{study}",
        output:
            **{
                name: f"results/nifti/{{study}}/{name}.nii.gz"
                for name in names.NIFTI_NAMES
            },
        log:
            "results/logs/link_nifti/{study}.log",
        conda:
            "../../envs/io.yaml"
        script:
            "../scripts/link_nifti.py"
