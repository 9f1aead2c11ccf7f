"""Entry script: the step map (and its QC figure) of one study."""

from stepseg import logs, targets
from stepseg.settings import TargetsSettings

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    targets.write_study_targets(
        study=snakemake.wildcards.study,
        seg_path=snakemake.input.seg,
        suv_path=snakemake.input.suv,
        ctres_path=snakemake.input.ctres,
        steps_path=snakemake.output.steps,
        qc_path=snakemake.output.qc,
        settings=TargetsSettings.from_mapping(snakemake.params.targets),
    )
