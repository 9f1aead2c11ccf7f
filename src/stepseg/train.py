"""Training of one model variant: the paper's UNet and loss recipe, resumable epoch by epoch.

`train_variant` is what the `train` rule calls, with the variant's `TrainSettings` (its
`targets`: `stepwise`, all channels of the target preset, or `plain`, the lesion mask only with
DiceFocal only, everything else identical).

After every epoch the full training state (model, optimiser, schedule, loss weights, RNG states,
log rows) is written atomically to `state_dir`; a restarted job continues from there and, on CPU,
ends with exactly the weights of an uninterrupted run (data sampling is a pure function of seed and
epoch, see `stepseg.data`).
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

STATE_FORMAT = "stepseg-train-state-1"
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


def _run(job: _Job) -> None:
    """One process's training (DDP rank or the only process)."""
    with distributed.process_group(model.resolve_device(job.settings.device)) as ctx:
        _train(job, ctx)


def _train(job: _Job, ctx: distributed.DistContext) -> None:
    settings = job.settings
    torch.set_num_threads(max(1, job.threads // ctx.world_size))
    device = ctx.device
    amp_dtype = model.autocast_dtype(device, settings.amp)
    model.autotune_convolutions(device)
    meta = tilestore.TileStore(job.train_lmdb).meta
    if not meta["studies"]:
        raise TrainingError(f"training split {job.train_lmdb} holds no study: nothing to train on")
    preset = presets.preset_from_settings(
        TargetsSettings.from_mapping(meta["targets"], f"{job.train_lmdb} targets")
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
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    lr_schedule = schedule.LrSchedule(settings)
    rows: list[dict[str, Any]] = []
    # what a resumed run must get back, by its key in the state file
    resumable = {
        "model": net,
        "criterion": criterion,
        "optimizer": optimizer,
        "scaler": scaler,
        "schedule": lr_schedule,
    }

    state_path = job.state_dir / STATE_FILE
    if _restore(state_path, settings, resumable, rows):
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

    train_set = _dataset(job.train_lmdb, settings, seed=settings.seed, validation=False)
    if len(train_set) == 0:
        raise TrainingError(f"training split {job.train_lmdb} yields no patch: nothing to train on")
    has_val = bool(tilestore.TileStore(job.val_lmdb).studies)
    val_set = (
        _dataset(job.val_lmdb, settings, seed=10_000 + settings.seed, validation=True)
        if has_val
        else None
    )
    if val_set is None:
        log.warning("validation split %s holds no study: no validation Dice", job.val_lmdb)

    while not lr_schedule.finished:
        epoch = lr_schedule.epoch + 1
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule.lr
        train_set.set_epoch(epoch)
        means = _train_epoch(step, train_set, epoch)
        # every rank steps the schedule with the global mean loss, so learning rates stay equal
        means = {name: distributed.mean_over_ranks(value, ctx) for name, value in means.items()}
        row: dict[str, Any] = {"epoch": epoch, "lr": lr_schedule.lr, **means}
        weights = criterion.weighting.weights()
        row.update({f"s_{n}": s for n, s in zip(criterion.term_names, weights, strict=True)})
        lr_schedule.step(means["loss"])
        validate = epoch % settings.val_every == 0 or lr_schedule.finished
        row["val_dice"] = (
            _validate(net, val_set, settings, device, amp_dtype) if validate and val_set else ""
        )
        row["seconds"] = round(time.perf_counter() - started, 3)
        rows.append(row)
        log.info("epoch %d: %s", epoch, _format_row(row))
        if ctx.is_main:
            _save_state(state_path, settings, resumable, rows)
        distributed.barrier(ctx)

    if ctx.is_main:
        model.save(
            job.model_path,
            net,
            model.ModelInfo(settings=settings, network=spec, target_preset=preset.to_dict()),
        )
        _write_log(job.log_csv, rows)
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
        image, steps = data.device_batch(batch, device)
        target, regions = _targets(steps, image, step.preset, settings)
        small = small_lesion_mask(steps) if settings.small_lesion_dice_weight > 0 else None
        inputs = model.network_inputs(image, settings.zero_input_channel)
        with _autocast(device, step.amp_dtype):
            logits = net(inputs.contiguous(memory_format=model.memory_format(device)))
        total, terms = criterion(logits, target, regions, small)
        if not torch.isfinite(total):
            raise TrainingError(
                f"{settings.trained_name}: loss is {total.item()} at epoch {epoch}, "
                f"batch {n_batches + 1} (studies {', '.join(batch['study'])}); terms: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            )
        if n_batches == 0:  # once an epoch: what each term asks of the shared features
            sums.update(term_gradient_norms(criterion, terms, shared["features"]))
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(total).backward()
        step.scaler.step(step.optimizer)
        step.scaler.update()
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
    path: Path, settings: TrainSettings, resumable: Mapping[str, Any], rows: list[dict[str, Any]]
) -> None:
    state = {
        "format": STATE_FORMAT,
        "settings": settings.to_dict(),
        **{key: part.state_dict() for key, part in resumable.items()},
        "rng": _rng_state(),
        "rows": rows,
    }
    model.save_atomic(state, path)


def _restore(
    path: Path, settings: TrainSettings, resumable: Mapping[str, Any], rows: list[dict[str, Any]]
) -> bool:
    """Load a saved state into `resumable` (key -> object with `load_state_dict`) and `rows` if
    it was written with the same settings; else start afresh."""
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("ignoring unreadable training state %s (%s); starting afresh", path, exc)
        return False
    if state.get("format") != STATE_FORMAT or state.get("settings") != settings.to_dict():
        log.warning("training state %s is from other settings; starting afresh", path)
        return False
    for key, part in resumable.items():
        part.load_state_dict(state[key])
    rows.extend(state["rows"])
    _set_rng_state(state["rng"])
    return True


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
