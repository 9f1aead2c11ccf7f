"""Entry script: the results table, figures and markdown report."""

import itertools
from pathlib import Path

from stepseg import logs, report
from stepseg.settings import ReportSettings

params, inputs, outputs = snakemake.params, snakemake.input, snakemake.output
with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    report.write_report(
        # the input lists are in the order of these keys (workflow/rules/report.smk)
        metrics_csvs=dict(
            zip(itertools.product(params.variants, params.eval_splits), inputs.metrics, strict=True)
        ),
        train_logs=dict(zip(params.fold_models, inputs.train_logs, strict=True)),
        test_images=dict(
            zip(params.test_studies, zip(inputs.suv, inputs.seg, strict=True), strict=True)
        ),
        test_predictions=params.test_predictions,
        outputs=report.ReportOutputs(
            table=Path(outputs.table),
            pairwise=Path(outputs.pairwise),
            markdown=Path(outputs.markdown),
            html=Path(outputs.html),
            distributions=Path(outputs.distributions),
            learning_curves=Path(outputs.learning_curves),
            curves=dict(zip(params.fold_models, map(Path, outputs.curves), strict=True)),
            cases=dict(zip(params.settings["mip_cases"], map(Path, outputs.cases), strict=True)),
        ),
        settings=ReportSettings.from_mapping(params.settings),
        data_source=params.data_source,
        folds=params.folds,
        gate_records=dict(zip(params.gated, inputs.gate_records, strict=True)),
    )
