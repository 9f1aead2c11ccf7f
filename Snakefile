# stepseg: step-by-step whole-body FDG-PET/CT lesion segmentation (Liu, Zhong & Mo, autoPET 2022).
# Stages talk only through files under results/; see README.md and docs/design.md.


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/nifti_dir.smk"
include: "workflow/rules/targets.smk"
include: "workflow/rules/pack.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/gate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs,
