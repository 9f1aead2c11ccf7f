"""Entry script: choose one trained variant's lesion-presence gate threshold out of fold and
write its gated predictions."""

from pathlib import Path

from stepseg import gate, logs

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    gate.gate_predictions(
        selection={
            split: [(study, Path(pred), Path(seg), fold) for study, pred, seg, fold in rows]
            for split, rows in snakemake.params.selection.items()
        },
        test=[(study, Path(pred)) for study, pred in snakemake.params.test],
        out_dir=snakemake.output.predictions,
        record_path=snakemake.output.record,
    )
