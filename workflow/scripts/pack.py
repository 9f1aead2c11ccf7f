"""Entry script: pack one split's studies into an LMDB of compressed 3-D tiles."""

from stepseg import checks, logs, pack
from stepseg.settings import PackSettings, TargetsSettings

with logs.job(snakemake.log[0], dict(snakemake.wildcards.items())):
    pack.pack_split(
        studies=snakemake.params.studies,
        suv_paths=snakemake.input.suv,
        ctres_paths=snakemake.input.ctres,
        steps_paths=snakemake.input.steps,
        out_dir=snakemake.output[0],
        settings=PackSettings.from_mapping(snakemake.params.pack),
        target_settings=TargetsSettings.from_mapping(snakemake.params.targets),
        ct_hu_range=checks.ct_hu_range(snakemake.config),
    )
