"""Training of one model variant: the paper's UNet and loss recipe, resumable epoch by epoch.

`train_variant` is what the `train` rule calls, with the variant's `TrainSettings` (its
`targets`: `stepwise`, all channels of the target preset, or `plain`, the lesion mask only with
DiceFocal only, everything else identical).

After every epoch the full training state (model, optimiser, schedule, loss weights, RNG states,
log rows) is written atomically to `state_dir`; a restarted job continues from there and, on CPU,
ends with exactly the weights of an uninterrupted run (data sampling is a pure function of seed and
epoch, see `stepseg.data`). A state records the settings and the data (both LMDBs'
`TileStore.data_identity`) it was trained with; with either changed the job starts afresh and
logs why, so a finished state never stands in for training on new data (the state folder is no
Snakemake output: nothing else would notice).
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from stepseg import channels, data, distributed, losses, model, presets, schedule, tilestore
from stepseg.atomic import atomic_file
from stepseg.settings import TargetsSettings, TrainSettings

log = logging.getLogger(__name__)

STATE_FORMAT = "stepseg-train-state-2"  # 2: the data identity
STATE_FILE = "state.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, no training data); the message names epoch and file."""


def small_lesion_mask(steps: torch.Tensor) -> torch.Tensor:
    """The released code's "small lesion" region of each crop: every voxel except those of its
    largest lesion component(s) (18-connected; those over half the largest's size), background
    included, so that its Dice term also penalises false positives; all voxels of a crop
    without lesion (utils_data_proc.get_small_lesion, data_loader_3d.py)."""
    import cc3d

    lesion = (steps == 0).cpu().numpy()
    out = np.ones(lesion.shape, dtype=bool)
    for b in range(lesion.shape[0]):
        labels = cc3d.connected_components(lesion[b, 0], connectivity=18)
        counts = np.bincount(labels.ravel())[1:]
        if counts.size == 0:
            continue
        large = np.flatnonzero(counts > 0.5 * counts.max()) + 1
        out[b, 0] = ~np.isin(labels, large)
    return torch.from_numpy(out).to(steps.device)


def train_variant(
    *,
    train_lmdb: str | Path,
    val_lmdb: str | Path,
    model_path: str | Path,
    log_csv: str | Path,
    state_dir: str | Path,
    settings: TrainSettings,
    threads: int,
) -> None:
    """Train one variant and write `model.pt` and `train_log.csv` (resuming from `state_dir`).

    `processes` > 1 trains with DDP on that many GPUs of this node (see `stepseg.distributed`):
    the same global batches, the same result up to float rounding.
    """
    job = _Job(
        train_lmdb=Path(train_lmdb),
        val_lmdb=Path(val_lmdb),
        model_path=Path(model_path),
        log_csv=Path(log_csv),
        state_dir=Path(state_dir),
        settings=settings,
        threads=threads,
    )
    if distributed.in_worker():  # started by torchrun: this process is one rank already
        _run(job)
    else:
        distributed.launch(settings.processes, _run, job)


@dataclass(frozen=True, kw_only=True)
class _Job:
    """One train job's paths and settings (what each DDP process is given)."""

    train_lmdb: Path
    val_lmdb: Path
    model_path: Path
    log_csv: Path
    state_dir: Path
    settings: TrainSettings
    threads: int


@dataclass(frozen=True, kw_only=True)
class _Step:
    """What one optimisation step uses, built once per job."""

    net: torch.nn.Module
    criterion: losses.StepwiseLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    preset: presets.Preset
    settings: TrainSettings
    ctx: distributed.DistContext
    amp_dtype: torch.dtype | None


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What set-up builds for one process's training. The schedule, the parts in `resumable`
    (the checkpoint, by their key in the state file) and `rows` change from epoch to epoch."""

    step: _Step
    net: torch.nn.Module  # unwrapped: validated and saved
    spec: model.NetworkSpec
    lr_schedule: schedule.LrSchedule
    resumable: dict[str, Any]
    rows: list[dict[str, Any]]
    data_identity: dict[str, Any]  # the train and val LMDBs' `TileStore.data_identity`
    train_set: data.PatchDataset
    val_set: data.PatchDataset | None
    state_path: Path


def _run(job: _Job) -> None:
    """One process's training (DDP rank or the only process)."""
    with distributed.process_group(model.resolve_device(job.settings.device)) as ctx:
        _train(job, ctx)


def _train(job: _Job, ctx: distributed.DistContext) -> None:
    """nnU-Net's trainer steps: set-up (resuming a saved state of the same settings and data),
    then epochs, each followed by a checkpoint, until the schedule ends; then the model."""
    run = _set_up(job, ctx)
    while not run.lr_schedule.finished:
        row = _epoch(run)
        run.rows.append(row)
        log.info("epoch %d: %s", row["epoch"], _format_row(row))
        if ctx.is_main:
            _save_state(run.state_path, job.settings, run.data_identity, run.resumable, run.rows)
        distributed.barrier(ctx)
    if ctx.is_main:
        _finish(job, run)


def _set_up(job: _Job, ctx: distributed.DistContext) -> _Run:
    """Network, loss, optimiser and schedule from the seed, then the saved state if it is of the
    same settings and data (`_restore`), and the training and validation patches."""
    settings = job.settings
    torch.set_num_threads(max(1, job.threads // ctx.world_size))
    device = ctx.device
    amp_dtype = model.autocast_dtype(device, settings.amp)
    model.autotune_convolutions(device)
    train_store = tilestore.TileStore(job.train_lmdb)
    if not train_store.studies:
        raise TrainingError(f"training split {job.train_lmdb} holds no study: nothing to train on")
    preset = presets.preset_from_settings(
        TargetsSettings.from_mapping(train_store.meta["targets"], f"{job.train_lmdb} targets")
    )
    channel_losses = (
        list(preset.channel_losses) if settings.targets == "stepwise" else ["dicefocal"]
    )
    spec = model.network_spec(settings, out_channels=len(channel_losses))
    model.check_patch_size(settings.patch_size, spec)
    log.info(
        "training %s on %s: recipe %s, targets %s (%d channels), device %s, amp %s",
        settings.trained_name, job.train_lmdb, settings.recipe, settings.targets,
        len(channel_losses), device, amp_dtype,
    )  # fmt: skip

    net, criterion, optimizer = _build(spec, channel_losses, settings, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    lr_schedule = schedule.LrSchedule(settings)
    resumable = {
        "model": net,
        "criterion": criterion,
        "optimizer": optimizer,
        "scaler": scaler,
        "schedule": lr_schedule,
    }
    rows: list[dict[str, Any]] = []
    data_identity = {
        "train": train_store.data_identity,
        "val": tilestore.TileStore(job.val_lmdb).data_identity,
    }
    state_path = job.state_dir / STATE_FILE
    if _restore(state_path, settings, data_identity, resumable, rows):
        log.info("resumed from %s after epoch %d", state_path, lr_schedule.epoch)
    step = _Step(
        net=distributed.wrap(net, ctx, extras=criterion),  # DDP averages the loss weights too
        criterion=criterion,
        optimizer=optimizer,
        scaler=scaler,
        preset=preset,
        settings=settings,
        ctx=ctx,
        amp_dtype=amp_dtype,
    )
    train_set, val_set = _datasets(job)
    return _Run(
        step=step,
        net=net,
        spec=spec,
        lr_schedule=lr_schedule,
        resumable=resumable,
        rows=rows,
        data_identity=data_identity,
        train_set=train_set,
        val_set=val_set,
        state_path=state_path,
    )


def _build(
    spec: model.NetworkSpec,
    channel_losses: list[str],
    settings: TrainSettings,
    device: torch.device,
) -> tuple[torch.nn.Module, losses.StepwiseLoss, torch.optim.Optimizer]:
    """Network, loss (with its learned weights) and optimiser, initialised from the seed."""
    _seed_everything(settings.seed)
    net = model.build(spec)
    if settings.mask_prior > 0:
        model.init_mask_prior(net, settings.mask_prior)
    net = net.to(device, memory_format=model.memory_format(device))
    criterion = losses.StepwiseLoss(channel_losses, settings).to(device)
    optimizer = torch.optim.Adam(
        [*net.parameters(), *criterion.parameters()],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    return net, criterion, optimizer


def _datasets(job: _Job) -> tuple[data.PatchDataset, data.PatchDataset | None]:
    """The training patches and the fixed validation patches (None without validation studies)."""
    settings = job.settings
    train_set = _dataset(job.train_lmdb, settings, seed=settings.seed, validation=False)
    if len(train_set) == 0:
        raise TrainingError(f"training split {job.train_lmdb} yields no patch: nothing to train on")
    if not tilestore.TileStore(job.val_lmdb).studies:
        log.warning("validation split %s holds no study: no validation Dice", job.val_lmdb)
        return train_set, None
    return train_set, _dataset(job.val_lmdb, settings, seed=10_000 + settings.seed, validation=True)


def _epoch(run: _Run) -> dict[str, Any]:
    """One epoch at the schedule's learning rate, the schedule's step with the mean loss of all
    ranks, and validation when due: the epoch's log row."""
    step, lr_schedule, settings = run.step, run.lr_schedule, run.step.settings
    epoch = lr_schedule.epoch + 1
    started = time.perf_counter()
    for group in step.optimizer.param_groups:
        group["lr"] = lr_schedule.lr
    run.train_set.set_epoch(epoch)
    means = _train_epoch(step, run.train_set, epoch)
    # every rank steps the schedule with the global mean loss, so learning rates stay equal
    means = {name: distributed.mean_over_ranks(value, step.ctx) for name, value in means.items()}
    row: dict[str, Any] = {"epoch": epoch, "lr": lr_schedule.lr, **means}
    weights = step.criterion.weighting.weights()
    row.update({f"s_{n}": s for n, s in zip(step.criterion.term_names, weights, strict=True)})
    lr_schedule.step(means["loss"])
    validate = epoch % settings.val_every == 0 or lr_schedule.finished
    row["val_dice"] = (
        _validate(run.net, run.val_set, settings, step.ctx.device, step.amp_dtype)
        if validate and run.val_set
        else ""
    )
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def _finish(job: _Job, run: _Run) -> None:
    """Write the trained model and the training log (the main process only)."""
    info = model.ModelInfo(
        settings=job.settings, network=run.spec, target_preset=run.step.preset.to_dict()
    )
    model.save(job.model_path, run.net, info)
    _write_log(job.log_csv, run.rows)
    log.info("wrote %s and %s", job.model_path, job.log_csv)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dataset(
    lmdb_path: Path, settings: TrainSettings, *, seed: int, validation: bool
) -> data.PatchDataset:
    """Training patches (oversampled lesions, flips) or a fixed validation set (same every time)."""
    samples = settings.val_samples if validation else settings.samples_per_epoch
    if samples == 0:
        samples = covering_samples(lmdb_path, settings.patch_size)
    dataset = data.PatchDataset(
        lmdb_path,
        patch_size=settings.patch_size,
        samples_per_epoch=samples,
        lesion_oversampling=settings.lesion_oversampling,
        lesion_centre_fraction=settings.lesion_centre_fraction,
        lesion_centres=settings.lesion_centres,
        seed=seed,
        flips=settings.flips and not validation,
        hot_centre_fraction=settings.hot_centre_fraction,
        crop_jitter=(0.0, 0.0, 0.0) if validation else settings.crop_jitter,
        crop_steps=settings.targets == "stepwise" and not validation,
    )
    if validation:
        dataset.set_epoch(0)
    return dataset


def covering_samples(lmdb_path: str | Path, patch_size: Sequence[int]) -> int:
    """Patches whose voxels add up to the split's voxels: "an epoch goes through all images"."""
    tiles = tilestore.TileStore(lmdb_path)
    voxels = sum(math.prod(tiles.study_meta(s)["shape"]) for s in tiles.studies)
    tiles.close()
    return math.ceil(voxels / math.prod(patch_size))


def _loader(
    dataset: data.PatchDataset,
    settings: TrainSettings,
    device: torch.device,
    ctx: distributed.DistContext | None = None,
) -> DataLoader:
    """Batches of `batch_size`; with a DDP rank's `ctx`, that rank's share of each."""
    return data.make_loader(
        dataset,
        settings.batch_size,
        settings.num_workers,
        pin_memory=device.type == "cuda",
        ctx=ctx,
    )


def _train_epoch(step: _Step, dataset: data.PatchDataset, epoch: int) -> dict[str, float]:
    """One pass over the epoch's batches: the mean loss and terms, and the term gradient norms
    of its first batch."""
    net, criterion, settings, ctx = step.net, step.criterion, step.settings, step.ctx
    net.train()
    device = ctx.device
    sums: dict[str, float] = {}
    n_batches = 0
    shared: dict[str, torch.Tensor] = {}
    hook = model.last_shared_layer(distributed.unwrap(net)).register_forward_hook(
        lambda _module, _inputs, output: shared.__setitem__("features", output)
    )
    batches = tqdm(
        _loader(dataset, settings, ctx.device, ctx),
        desc=f"epoch {epoch}",
        leave=False,
        disable=not ctx.is_main,
    )
    for batch in batches:
        total, terms = _batch_loss(step, *data.device_batch(batch, device))
        if not torch.isfinite(total):
            raise TrainingError(
                f"{settings.trained_name}: loss is {total.item()} at epoch {epoch}, "
                f"batch {n_batches + 1} (studies {', '.join(batch['study'])}); terms: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            )
        if n_batches == 0:  # once an epoch: what each term asks of the shared features
            sums.update(term_gradient_norms(criterion, terms, shared["features"]))
        _optimise(step, total)
        n_batches += 1
        for name, value in [("loss", total), *terms.items()]:
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        batches.set_postfix(loss=f"{sums['loss'] / n_batches:.4f}", refresh=False)
    hook.remove()
    if n_batches == 0:
        raise TrainingError(f"epoch {epoch}: the training loader gave no batch")
    return {
        name: value if name.startswith("grad_") else value / n_batches
        for name, value in sums.items()
    }


def _batch_loss(
    step: _Step, image: torch.Tensor, steps: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch (`data.device_batch`) and its terms, with the graph for backward."""
    settings, device = step.settings, step.ctx.device
    target, regions = _targets(steps, image, step.preset, settings)
    small = small_lesion_mask(steps) if settings.small_lesion_dice_weight > 0 else None
    inputs = model.network_inputs(image, settings.zero_input_channel)
    with _autocast(device, step.amp_dtype):
        logits = step.net(inputs.contiguous(memory_format=model.memory_format(device)))
    return step.criterion(logits, target, regions, small)


def _optimise(step: _Step, loss: torch.Tensor) -> None:
    """One optimiser step on the gradient of `loss` alone: the previous batch's is cleared
    first (backward adds to what the parameters hold)."""
    step.optimizer.zero_grad(set_to_none=True)
    step.scaler.scale(loss).backward()
    step.scaler.step(step.optimizer)
    step.scaler.update()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype))


def term_gradient_norms(
    criterion: losses.StepwiseLoss, terms: Mapping[str, torch.Tensor], features: torch.Tensor
) -> dict[str, float]:
    """`grad_<term>`: the norm of each weighted loss term's gradient at the last feature map
    all outputs share (`model.last_shared_layer`): whether the mask or the auxiliary channels
    steer the network (logged for the first batch of each epoch; the weights are the current
    automatic or fixed ones)."""
    factors = criterion.weighting.factors()
    norms = {}
    for name, factor in zip(criterion.term_names, factors, strict=True):
        (grad,) = torch.autograd.grad(terms[name], features, retain_graph=True)
        norms[f"grad_{name}"] = float(factor) * float(grad.float().norm())
    return norms


def _targets(
    steps: torch.Tensor, image: torch.Tensor, preset: presets.Preset, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Targets for the variant: all preset channels (stepwise) or the lesion mask only (plain)."""
    target = channels.expand(steps, image, preset)
    if settings.targets == "plain":
        return target[:, :1], None
    return target, channel_regions(steps, preset) if settings.masked_mse else None


def channel_regions(steps: torch.Tensor, preset: presets.Preset) -> torch.Tensor:
    """Each channel's dilated mask (B, C, D, H, W) bool, for the released code's masked MSE.

    The full dilated mask, lesion included, also for hollow channels: the released code's
    `aux_mask_list` holds the masks before hollowing (data_loader_3d.py)."""
    regions = torch.zeros(
        (steps.shape[0], preset.n_channels, *steps.shape[2:]), dtype=torch.bool, device=steps.device
    )
    for index, channel in enumerate(preset.channels):
        if channel.step is not None:
            regions[:, index : index + 1] = steps <= channel.step
    return regions


@torch.no_grad()
def _validate(
    net: torch.nn.Module,
    dataset: data.PatchDataset,
    settings: TrainSettings,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> float:
    """Dice of channel 0 (sigmoid > 0.5) pooled over a fixed set of validation patches.

    Pooled (2 TP / (2 TP + FP + FN) over all patches) rather than averaged per patch, so that
    lesion-free patches count through their false positives instead of giving Dice 0 or 1.
    """
    net.eval()
    tp = fp = fn = 0.0
    for batch in _loader(dataset, settings, device):
        image, steps = data.device_batch(batch, device)
        truth = steps == 0
        inputs = model.network_inputs(image, settings.zero_input_channel)
        with _autocast(device, amp_dtype):
            logits = net(inputs.contiguous(memory_format=model.memory_format(device)))
        pred = logits[:, :1].float() > 0  # sigmoid(x) > 0.5
        tp += float((pred & truth).sum())
        fp += float((pred & ~truth).sum())
        fn += float((~pred & truth).sum())
    net.train()
    return 1.0 if tp + fp + fn == 0 else round(2 * tp / (2 * tp + fp + fn), 6)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _plain(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _save_state(
    path: Path,
    settings: TrainSettings,
    data_identity: Mapping[str, Any],
    resumable: Mapping[str, Any],
    rows: list[dict[str, Any]],
) -> None:
    """The checkpoint after an epoch: everything `_restore` needs to go on, and the settings and
    data (`TileStore.data_identity` of each split) it is valid for."""
    state = {
        "format": STATE_FORMAT,
        "settings": settings.to_dict(),
        "data": dict(data_identity),
        **{key: part.state_dict() for key, part in resumable.items()},
        "rng": _rng_state(),
        "rows": rows,
    }
    model.save_atomic(state, path)


def _restore(
    path: Path,
    settings: TrainSettings,
    data_identity: Mapping[str, Any],
    resumable: Mapping[str, Any],
    rows: list[dict[str, Any]],
) -> bool:
    """Load a saved state into `resumable` (key -> object with `load_state_dict`) and `rows` if
    it was written with the same settings on the same data; else start afresh and say why."""
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("ignoring unreadable training state %s (%s); starting afresh", path, exc)
        return False
    if state.get("format") != STATE_FORMAT:
        log.warning(
            "training state %s has format %s, not %s (written by another stepseg version); "
            "starting afresh", path, state.get("format"), STATE_FORMAT,
        )  # fmt: skip
        return False
    if state.get("settings") != settings.to_dict():
        log.warning("training state %s is from other settings; starting afresh", path)
        return False
    changes = data_changes(state["data"], data_identity)
    if changes:
        log.warning(
            "training state %s is from other data (%s); starting afresh", path, "; ".join(changes)
        )
        return False
    for key, part in resumable.items():
        part.load_state_dict(state[key])
    rows.extend(state["rows"])
    _set_rng_state(state["rng"])
    return True


def data_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How the data of a training state (split -> `TileStore.data_identity`) differ from the
    job's, one line per split; empty when they are the same."""
    changes = []
    for split, identity in current.items():
        before = saved[split]
        old, new = dict(before["studies"]), dict(identity["studies"])
        changed = [study for study, digest in new.items() if old.get(study) != digest]
        dropped = [study for study in old if study not in new]
        if changed or dropped:
            changes.append(
                f"{split} split studies differ: {len(changed)} of {len(new)} new or changed"
                f"{_some(changed)}, {len(dropped)} dropped{_some(dropped)}"
            )
        elif before["studies"] != identity["studies"]:
            changes.append(f"{split} split holds the same studies in another order")
        if before["targets"] != identity["targets"]:
            changes.append(f"{split} split was packed with other target settings")
    return changes


def _some(studies: Sequence[str], shown: int = 3) -> str:
    """` (A, B, C, ...)`: the first few of `studies`, for a log line."""
    if not studies:
        return ""
    return f" ({', '.join(studies[:shown])}{', ...' if len(studies) > shown else ''})"


def _write_log(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _format_row(row: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
        for k, v in row.items()
        if k != "epoch"
    )
