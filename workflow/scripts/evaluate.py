"""Entry script: autoPET metrics of one variant on one split."""

from stepseg import logs, metrics
from stepseg.settings import EvaluateSettings

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    metrics.evaluate_split(
        studies=snakemake.params.studies,
        seg_paths=snakemake.input.seg,
        suv_paths=snakemake.input.suv,
        pred_paths=snakemake.params.pred_paths,
        per_study_csv=snakemake.output.per_study,
        summary_csv=snakemake.output.summary,
        settings=EvaluateSettings.from_mapping(snakemake.params.settings),
    )
