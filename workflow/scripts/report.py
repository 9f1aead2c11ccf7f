"""Entry script: the results table, figures and markdown report."""

from stepseg import logs, report

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    report.write_report(
        metrics_csvs=snakemake.input.metrics,
        train_logs=snakemake.input.train_logs,
        outputs=dict(snakemake.output.items()),
        settings=snakemake.params.settings,
        suv_paths=snakemake.input.suv,
        seg_paths=snakemake.input.seg,
        test_predictions=snakemake.params.test_predictions,
        data_source=snakemake.params.data_source,
    )
