import functools
import os
import sys
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

# The workflow itself reads the manifest and the LMDB format with the same package, also when
# Snakemake runs from an environment without stepseg installed (e.g. conda's snakemake).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
import stepseg  # noqa: E402  (the bare package: no numpy, no torch)
import stepseg.devices  # noqa: E402  (standard library only)
import stepseg.sources  # noqa: E402  (standard library only until a source is used)
from stepseg import names  # noqa: E402  (standard library only)
from stepseg.settings import (  # noqa: E402  (standard library only)
    ConvertSettings,
    EvaluateSettings,
    GateSettings,
    InferSettings,
    PackSettings,
    ReportSettings,
    TargetsSettings,
    ThresholdSettings,
    TrainSettings,
)


def jobs_run_here():
    """Whether jobs run on this machine (local executor) rather than on cluster or cloud nodes.

    Asked when a job's resources are evaluated, after Snakemake chose its executor. On a SLURM
    node the job's own Snakemake (executor slurm-jobstep) is non-local too, so it computes the
    same `gpu` as the login node and hands it to srun (--gpus). A dry run
    (-n) swaps the chosen executor for Snakemake's `dryrun` one, which counts as local; Snakemake
    (9.x, snakemake/api.py) then still forces `use_threads` for a non-local chosen executor, so
    that flag tells a dry run of a cluster profile from a local one (tests/test_workflow.py checks
    both against profiles/slurm and profiles/default).
    """
    if not workflow.local_exec:
        return False
    if workflow.dryrun and workflow.execution_settings.use_threads:
        return False
    return True


def gpus_per_process(device):
    """GPUs for each process of a train or infer job: `compute.gpus`, or for `auto` 1 wherever
    jobs run on other machines (a cluster's login node has no say) and, where they run here,
    1 only if this machine has a card (/dev/nvidia<k>): on a CPU-only workstation a `gpu` request
    would run them one at a time under profiles/default's `gpu` limit. None for `device: cpu`.
    """
    if device == "cpu":
        return 0
    setting = config["compute"]["gpus"]
    if setting != "auto":
        return int(setting)
    if not jobs_run_here():
        return 1
    return 1 if stepseg.devices.installed_gpus() else 0


def train_gpus(wildcards):
    """A train job's `gpu` resource: one card per DDP process (`train.processes`)."""
    settings = TRAINED[wildcards.trained]
    return settings.processes * gpus_per_process(settings.device)


def train_priority(wildcards):
    """Longest trainings first, so that no core idles at the end of the training phase (longest
    processing time first): a training's cost is its samples (`epochs` x `samples_per_epoch`),
    2.6x for step-by-step targets, whose per-crop step maps cost more than the default network
    (2.2 against 0.84 s an epoch on 2 CPU cores; docs/experiments.md). Only the order among jobs
    ready together changes, never a result.
    """
    return _training_cost(TRAINED[wildcards.trained])


def pack_priority(wildcards):
    """Above every training: a pack job takes seconds and unblocks a fold's trainings, which
    would otherwise wait behind every other ready training (Snakemake does not pass a job's
    priority on to the jobs it needs)."""
    return 1 + max(_training_cost(settings) for settings in TRAINED.values())


def _training_cost(settings):
    cost = settings.epochs * settings.samples_per_epoch
    return int(cost * (2.6 if settings.targets == "stepwise" else 1.0))


def infer_gpus(wildcards):
    """An infer job's `gpu` resource: one card, unless the model's variant trains on the CPU."""
    return gpus_per_process(TRAINED[wildcards.trained].device)


# Every stage's typed settings, built once when the workflow starts: an unknown key, a wrong type
# or a setting a variant cannot run (fp16 on `device: cpu`) stops it here, naming the key, before
# any job deletes the outputs it would rewrite. Jobs get `to_dict()` of theirs as params (plain
# values: Snakemake reruns a job whose params changed) and rebuild the object from it.
SETTINGS = {
    kind.section: kind.from_mapping(config.get(kind.section, {}))
    for kind in (
        ConvertSettings,
        TargetsSettings,
        PackSettings,
        InferSettings,
        ThresholdSettings,
        EvaluateSettings,
        GateSettings,
        ReportSettings,
    )
}
# one per trained model, `<variant>-seed<k>`
TRAINED = {
    names.trained_name(variant, seed): TrainSettings.for_variant(
        config["train"], variant, seed
    )
    for variant, spec in config["train"]["variants"].items()
    for seed in spec["seeds"]
}

# the lesion-presence gate's variants (`gate.enabled`): {`<variant>_gated-seed<k>`: the trained
# model whose predictions it gates}, one per model with step-by-step targets
GATED = {
    names.gated_name(trained): trained
    for trained, settings in TRAINED.items()
    if SETTINGS["gate"].enabled and settings.targets == "stepwise"
}
if set(GATED) & set(TRAINED):
    raise ValueError(
        f"variants {sorted(set(GATED) & set(TRAINED))} are configured and also the gated "
        f"variants of others: rename them, or set gate.enabled: false"
    )

# cross-validation folds (`train.folds`, the section's alone): 1 = the train/val split
FOLDS = TrainSettings.for_variant(config["train"]).folds
SPLITS = list(names.SPLITS)
EVAL_SPLITS = list(names.eval_splits(FOLDS))
SOURCE = config["download"]["source"]


wildcard_constraints:
    study=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    split="|".join(SPLITS),
    eval_split="|".join(EVAL_SPLITS),
    trained=names.TRAINED_PATTERN,
    fold=r"0|[1-9][0-9]*",
    variant=rf"{names.TRAINED_PATTERN}|{names.VARIANT_PATTERN}",


def studies(split=None):
    """Sorted study ids (of one split; "oof": every non-test study), once the manifest checkpoint
    has run.

    Asks the checkpoint on every call (that is what makes the calling job wait for the manifest),
    but parses the table once per version of the file: the input functions of the pack, evaluate
    and report jobs ask dozens of times while the DAG is built.
    """
    _, by_split = _manifest(checkpoints.manifest.get().output[0])
    return list(by_split[split])


def fold_studies(fold):
    """Sorted study ids of cross-validation fold `fold` (an int), once the manifest has run."""
    _, by_split = _manifest(checkpoints.manifest.get().output[0])
    return list(by_split[("fold", fold)])


def pack_studies(fold, part):
    """The studies of fold `fold`'s `part` LMDB: with cross-validation every non-test study not in
    the fold (train) or in it (val); without, the train and val splits (fold 0 only)."""
    if FOLDS == 1:
        return studies(part)
    if part == "val":
        return fold_studies(fold)
    held_out = set(fold_studies(fold))
    return [study for study in studies(names.OUT_OF_FOLD) if study not in held_out]


def _manifest(path):
    """({study id: manifest row}, {split, "oof", ("fold", f) or None: sorted study ids}) of the
    manifest file."""
    version = os.stat(path)
    return _parse_manifest(path, version.st_ino, version.st_mtime_ns, version.st_size)


@functools.lru_cache(maxsize=1)
def _parse_manifest(path, inode, mtime_ns, size):
    """`_manifest`, parsed once per version of the file (the version is the cache key only)."""
    import stepseg.manifest

    table = stepseg.manifest.read(path)
    rows = {row["study_id"]: row for row in table.to_dict("records")}
    by_split = {None: tuple(sorted(rows))}
    for split in SPLITS:
        by_split[split] = tuple(sorted(table.loc[table["split"] == split, "study_id"]))
    by_split[names.OUT_OF_FOLD] = tuple(
        sorted(table.loc[table["split"] != "test", "study_id"])
    )
    for fold in range(FOLDS):
        chosen = (
            table["fold"] == str(fold) if "fold" in table else table["split"] == "val"
        )
        by_split[("fold", fold)] = tuple(sorted(table.loc[chosen, "study_id"]))
    return rows, by_split


def study_identity(wildcards):
    """What results/raw/{study} holds depends on: the study's manifest row (series UIDs, image
    counts, source folders), never its split, plus the source settings that shape its files.

    Per study, so that adding a patient to download.tcia.patient_ids fetches only the new
    studies. The manifest file is read directly when it lists the study: asked through the
    checkpoint before Snakemake counts it as done (a first DAG pass, e.g. for a target like
    results/nifti/<study>/SUV.nii.gz), the param would be <TBD>, which Snakemake takes for a
    changed param and reruns the conversion. Without the file or the study, the job waits for
    the checkpoint and is built again after it (the manifest is its input).
    """
    row = _manifest_row(checkpoints.manifest.rule.output[0], wildcards.study)
    if row is None:
        path = checkpoints.manifest.get().output[0]
        row = _manifest_row(path, wildcards.study)
        if row is None:
            raise ValueError(f"study {wildcards.study} is not in the manifest {path}")
    return stepseg.sources.study_identity(SOURCE, config["download"][SOURCE], row)


def _manifest_row(path, study):
    """The study's manifest row, None without the file or the study."""
    if not os.path.exists(path):
        return None
    rows, _ = _manifest(path)
    return rows.get(study)


def trained_variants():
    """Trained models, one per configured variant and seed: `<variant>-seed<k>` (a fold ensemble
    with cross-validation: the report's model of that seed)."""
    return list(TRAINED)


def fold_model(trained, fold):
    """The model.pt of fold `fold` of a trained model (fold0 alone without cross-validation)."""
    return f"results/models/{trained}/{names.fold_folder(fold)}/model.pt"


def train_logs():
    """{`<variant>-seed<k>-fold<f>`: its train_log.csv} of every training job."""
    return {
        names.fold_model_name(trained, fold): (
            f"results/models/{trained}/{names.fold_folder(fold)}/train_log.csv"
        )
        for trained in trained_variants()
        for fold in range(FOLDS)
    }


def model_job_threads():
    """Threads of one training or inference job: the cores shared by the models that can run
    side by side (one training job per trained variant and fold), at most 8.

    A small network keeps two threads only about 75 % busy, so on 2 cores two models train side
    by side on one thread each rather than one after the other on two.
    profiles/slurm sets the threads of a cluster job itself.
    """
    cores = workflow.resource_settings.cores or 1
    return min(8, max(1, cores // max(1, len(trained_variants()) * FOLDS)))


def nifti_paths(name, split, chunk=None):
    """`results/nifti/{study}/<name>.nii.gz` of every study of `split` (of its infer chunk
    `chunk` only, if given), in study order."""
    chosen = studies(split) if chunk is None else infer_chunk(split, chunk)[0]
    return expand(f"results/nifti/{{study}}/{name}.nii.gz", study=chosen)


def _chunked(chosen):
    """`chosen` in chunks of at most `infer.studies_per_job` studies, in order."""
    per_job = SETTINGS["infer"].studies_per_job
    return [chosen[start : start + per_job] for start in range(0, len(chosen), per_job)]


def infer_chunks(split):
    """{chunk name: (its studies, the folds whose models predict them)} of the infer jobs of
    `split`: `chunk-<k>` holds the sorted studies k * n to k * n + n - 1 (n =
    `infer.studies_per_job`), so a cluster spreads a model's inference over nodes while each job
    loads torch and the models once. Test chunks are predicted by every fold's model (the fold
    ensemble), val chunks by fold 0's (no cross-validation); out-of-fold chunks are
    `fold<f>-chunk-<k>`, fold f's studies predicted by the model that did not train on them.

    By sorted position rather than by hash: every chunk but the last is full, so there are as few
    jobs as there can be. A study added to (or removed from) a split reruns its chunk and every
    later one of that split; adding a patient redraws the splits anyway (`manifest.assign_splits`).
    """
    if split == names.OUT_OF_FOLD:
        return {
            f"{names.fold_folder(fold)}-chunk-{k}": (chosen, [fold])
            for fold in range(FOLDS)
            for k, chosen in enumerate(_chunked(fold_studies(fold)))
        }
    folds = list(range(FOLDS)) if split == "test" else [0]
    return {
        f"chunk-{k}": (chosen, folds)
        for k, chosen in enumerate(_chunked(studies(split)))
    }


def infer_chunk(split, chunk):
    """(studies, folds) of infer chunk `chunk` (a wildcard value) of `split`."""
    chunks = infer_chunks(split)
    if chunk not in chunks:
        raise ValueError(
            f"{split} has the infer chunks {', '.join(chunks)}, not {chunk}"
        )
    return chunks[chunk]


def infer_models(wildcards):
    """The model.pt of every fold whose model predicts this infer job's studies."""
    _, folds = infer_chunk(wildcards.eval_split, wildcards.chunk)
    return [fold_model(wildcards.trained, fold) for fold in folds]


def infer_chunk_dir(variant, split, chunk):
    """The output of the infer job of a trained `variant` on chunk `chunk` (a name) of `split`."""
    return f"results/predictions/{variant}/{split}/{chunk}"


def prediction_paths(variant, split):
    """Every prediction of `variant` on `split`, in the order of `studies(split)`: a trained
    model's in its infer chunks' folders, the threshold baseline's one per study."""
    if variant in trained_variants():
        path = {
            study: f"{infer_chunk_dir(variant, split, chunk)}/{study}.nii.gz"
            for chunk, (chosen, _) in infer_chunks(split).items()
            for study in chosen
        }
        return [path[study] for study in studies(split)]
    return expand(
        "results/predictions/{variant}/{split}/{study}.nii.gz",
        variant=variant,
        split=split,
        study=studies(split),
    )


def prediction_inputs(variant, split):
    """The inputs that give those predictions: a trained model's chunk folders (the infer jobs),
    a gated variant's folder (its gate job), the threshold baseline's per-study files (the
    infer_threshold jobs)."""
    if variant in trained_variants():
        return [infer_chunk_dir(variant, split, chunk) for chunk in infer_chunks(split)]
    if variant in GATED:
        return [f"results/predictions/{variant}"]
    return prediction_paths(variant, split)


def all_variants():
    """Every evaluated variant: the trained models, their gated variants, the baseline."""
    return trained_variants() + list(GATED) + ["threshold"]


def gate_record(gated):
    """The gate job's record (threshold, curve) of a gated variant."""
    return f"results/gate/{GATED[gated]}.json"


def gate_selection(trained):
    """{selection split: [(study, its prediction, its SEG, its fold)]} of the gate job of
    `trained`: the out-of-fold studies with cross-validation, else the val split (fold 0).
    """
    split = EVAL_SPLITS[0]
    fold_of = {study: fold for fold in range(FOLDS) for study in fold_studies(fold)}
    return {
        split: [
            (
                study,
                prediction,
                f"results/nifti/{study}/SEG.nii.gz",
                fold_of.get(study, 0),
            )
            for study, prediction in zip(
                studies(split), prediction_paths(trained, split)
            )
        ]
    }


def variant_settings(wildcards):
    """Only this model's settings, so that editing one variant reruns only that variant."""
    return TRAINED[wildcards.trained].to_dict()


def final_outputs(wildcards):
    """The report, and every variant's metrics by name: Snakemake looks for missing files only
    from the jobs a target asks for, so with the report alone an added seed or variant (new
    metrics the existing report has never read) ran nothing."""
    return ["results/report/results.md"] + expand(
        "results/metrics/{variant}/{eval_split}_per_study.csv",
        variant=all_variants(),
        eval_split=EVAL_SPLITS,
    )
