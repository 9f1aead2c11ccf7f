import os
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


validate(config, schema="../../config/schema.yaml")

# Entry scripts import the stepseg package from this checkout, also inside --use-conda envs and
# on cluster nodes (the variable is exported with every job).
# (Set here, not read: nothing for the user to provide, hence no `envvars:` directive.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        [str(Path(workflow.basedir) / "src"), os.environ.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
)

SPLITS = ["train", "val", "test"]
EVAL_SPLITS = ["val", "test"]
SOURCE = config["download"]["source"]


wildcard_constraints:
    study=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    split="|".join(SPLITS),
    eval_split="|".join(EVAL_SPLITS),
    trained=r"[A-Za-z0-9_]+-seed[0-9]+",
    variant=r"[A-Za-z0-9_]+(-seed[0-9]+)?",


def manifest_table():
    """The manifest, read after the manifest checkpoint has run."""
    import stepseg.manifest

    return stepseg.manifest.read(checkpoints.manifest.get().output[0])


def studies(split=None):
    table = manifest_table()
    if split is not None:
        table = table[table["split"] == split]
    return sorted(table["study_id"])


def trained_variants():
    """Trained model variants, one per configured model and seed: `<name>-seed<k>`."""
    return [
        f"{name}-seed{seed}"
        for name, spec in config["train"]["variants"].items()
        for seed in spec["seeds"]
    ]


def all_variants():
    return trained_variants() + ["threshold"]


def variant_settings(wildcards):
    """Only this variant's settings, so that editing one variant reruns only that variant."""
    name, seed = wildcards.trained.rsplit("-seed", 1)
    common = {k: v for k, v in config["train"].items() if k != "variants"}
    return {
        **common,
        **config["train"]["variants"][name],
        "name": name,
        "seed": int(seed),
    }


def final_outputs(wildcards):
    return ["results/report/results.md"]
