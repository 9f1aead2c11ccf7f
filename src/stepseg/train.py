"""Training of one model variant: the paper's UNet and loss recipe, resumable epoch by epoch.

`train_variant` is what the `train` rule calls. Settings are the merged `train` section of the
config plus the variant's `name`, `seed` and `targets` (`stepwise`: all channels of the target
preset; `plain`: the lesion mask only, DiceFocal only, everything else identical). `train.recipe`
(`paper` or `released_code`) fills every key the config does not set (see `RECIPES`).

After every epoch the full training state (model, optimiser, schedule, loss weights, RNG states,
log rows) is written atomically to `state_dir`; a restarted job continues from there and, on CPU,
ends with exactly the weights of an uninterrupted run (data sampling is a pure function of seed and
epoch, see `stepseg.data`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from stepseg import channels, data, distributed, losses, model, presets, schedule, tilestore
from stepseg.atomic import atomic_file

log = logging.getLogger(__name__)

STATE_FORMAT = "stepseg-train-state-1"
STATE_FILE = "state.pt"

# Defaults each recipe gives to keys the config leaves out (the config always wins).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "channels": [96, 192, 384, 768, 1536],
        "num_res_units": 4,
        "norm": "instance",
        "zero_input_channel": False,
        "optimizer": "adam",
        "lr": 3e-4,
        "weight_decay": 0.0,
        "batch_size": 16,
        "patch_size": [32, 160, 160],
        "schedule": "plateau_cosine",
        "epochs": 1000,
        "plateau_window": 15,
        "plateau_factor": 2.5,
        "plateau_min_decrease": 5e-3,
        "restart_below_lr": 1e-5,
        "restart_lr": 1e-4,
        "cosine_epochs": 100,
        "lambda_dice": 1.0,
        "lambda_focal": 1.0,
        "dice_batch": False,
        "mask_prior": 0.0,
        "mask_loss_scale": 1.0,
        "small_lesion_dice_weight": 0.0,
        "masked_mse": False,
        "loss_weighting": "automatic",
        "aux_loss_weight": 1.0,
        "mask_head": "shared",
        "crop_jitter": [0.9375, 0.6667, 0.6667],
    },
    "released_code": {
        "channels": [96, 192, 192, 192, 192],
        "num_res_units": 4,
        "norm": "batch",
        "zero_input_channel": True,
        "optimizer": "adam",
        "lr": 1.7e-4,
        "weight_decay": 4e-5,
        "batch_size": 8,
        "patch_size": [32, 160, 160],
        "schedule": "cosine",
        "epochs": 300,
        "lambda_dice": 1.0,
        "lambda_focal": 2.0,
        "dice_batch": False,
        "mask_prior": 0.0,
        "mask_loss_scale": 3.0,
        "small_lesion_dice_weight": 0.05,
        "masked_mse": True,
        "loss_weighting": "automatic",
        "aux_loss_weight": 1.0,
        "mask_head": "shared",
        "crop_jitter": [0.9375, 0.6667, 0.6667],
    },
}

# Defaults independent of the recipe (sampling, validation, hardware).
COMMON_DEFAULTS: dict[str, Any] = {
    "samples_per_epoch": 0,
    "lesion_oversampling": 2.0,
    "lesion_centre_fraction": 0.5,
    "hot_centre_fraction": 0.0,
    "flips": True,
    "val_every": 5,
    "val_samples": 32,
    "device": "auto",
    "amp": "auto",
    "num_workers": 0,
    "processes": 1,
    "dropout": 0.0,
    "targets": "stepwise",
    "seed": 0,
    "name": "model",
}


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, no training data); the message names epoch and file."""


def resolve_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Recipe defaults, then common defaults, then the config's keys; plain types only."""
    recipe = str(settings.get("recipe", "paper"))
    if recipe not in RECIPES:
        raise ValueError(f"unknown train.recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    merged = {**RECIPES[recipe], **COMMON_DEFAULTS, "recipe": recipe}
    merged.update({k: v for k, v in settings.items() if k not in ("variants", "seeds")})
    if merged["targets"] not in ("stepwise", "plain"):
        raise ValueError(f"unknown targets {merged['targets']!r}; expected stepwise or plain")
    return json.loads(json.dumps(merged))


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
    train_lmdb: str | Path,
    val_lmdb: str | Path,
    model_path: str | Path,
    log_csv: str | Path,
    state_dir: str | Path,
    settings: Mapping[str, Any],
    threads: int,
) -> None:
    """Train one variant and write `model.pt` and `train_log.csv` (resuming from `state_dir`).

    `processes` > 1 trains with DDP on that many GPUs of this node (see `stepseg.distributed`):
    the same global batches, the same result up to float rounding.
    """
    cfg = resolve_settings(settings)
    args = (train_lmdb, val_lmdb, model_path, log_csv, state_dir, settings, threads)
    if int(cfg["processes"]) > 1 and not distributed.in_worker():
        distributed.launch(int(cfg["processes"]), train_variant, *args)
        return
    with distributed.process_group(model.resolve_device(cfg["device"])) as ctx:
        _train_variant(*args[:5], cfg, threads, ctx)


def _train_variant(
    train_lmdb: str | Path,
    val_lmdb: str | Path,
    model_path: str | Path,
    log_csv: str | Path,
    state_dir: str | Path,
    cfg: dict[str, Any],
    threads: int,
    ctx: distributed.DistContext,
) -> None:
    torch.set_num_threads(max(1, int(threads) // ctx.world_size))
    device = ctx.device
    amp_dtype = model.autocast_dtype(device, str(cfg["amp"]))
    meta = tilestore.TileStore(train_lmdb).meta
    if not meta["studies"]:
        raise TrainingError(f"training split {train_lmdb} holds no study: nothing to train on")
    preset = presets.preset_from_settings(meta["targets"])
    channel_losses = list(preset.channel_losses) if cfg["targets"] == "stepwise" else ["dicefocal"]
    in_channels = 3 if cfg["zero_input_channel"] else 2
    spec = model.network_spec(cfg, out_channels=len(channel_losses), in_channels=in_channels)
    model.check_patch_size(cfg["patch_size"], spec)
    log.info(
        "training %s-seed%s on %s: recipe %s, targets %s (%d channels), device %s, amp %s",
        cfg["name"], cfg["seed"], train_lmdb, cfg["recipe"], cfg["targets"],
        len(channel_losses), device, amp_dtype,
    )  # fmt: skip

    _seed_everything(int(cfg["seed"]))
    net = model.build(spec)
    if float(cfg["mask_prior"]) > 0:
        model.init_mask_prior(net, float(cfg["mask_prior"]))
    net = net.to(device, memory_format=model.memory_format(device))
    criterion = losses.StepwiseLoss(channel_losses, cfg).to(device)
    optimizer = torch.optim.Adam(
        [*net.parameters(), *criterion.parameters()],
        lr=float(cfg["lr"]),
        weight_decay=float(cfg["weight_decay"]),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    lr_schedule = schedule.LrSchedule(cfg)
    rows: list[dict[str, Any]] = []
    # what a resumed run must get back, by its key in the state file
    resumable = {
        "model": net,
        "criterion": criterion,
        "optimizer": optimizer,
        "scaler": scaler,
        "schedule": lr_schedule,
    }

    state_path = Path(state_dir) / STATE_FILE
    if _restore(state_path, cfg, resumable, rows):
        log.info("resumed from %s after epoch %d", state_path, lr_schedule.epoch)
    train_net = distributed.wrap(net, ctx, extras=criterion)  # DDP averages the loss weights too

    train_set = _dataset(train_lmdb, cfg, seed=int(cfg["seed"]), validation=False)
    if len(train_set) == 0:
        raise TrainingError(f"training split {train_lmdb} yields no patch: nothing to train on")
    has_val = bool(tilestore.TileStore(val_lmdb).studies)
    val_set = _dataset(val_lmdb, cfg, 10_000 + int(cfg["seed"]), True) if has_val else None
    if val_set is None:
        log.warning("validation split %s holds no study: no validation Dice", val_lmdb)

    while not lr_schedule.finished:
        epoch = lr_schedule.epoch + 1
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule.lr
        train_set.set_epoch(epoch)
        means = _train_epoch(
            train_net, criterion, optimizer, scaler, train_set, preset, cfg, ctx, amp_dtype, epoch
        )
        # every rank steps the schedule with the global mean loss, so learning rates stay equal
        means = {name: distributed.mean_over_ranks(value, ctx) for name, value in means.items()}
        row: dict[str, Any] = {"epoch": epoch, "lr": lr_schedule.lr, **means}
        weights = criterion.weighting.weights()
        row.update({f"s_{n}": s for n, s in zip(criterion.term_names, weights, strict=True)})
        lr_schedule.step(means["loss"])
        validate = epoch % int(cfg["val_every"]) == 0 or lr_schedule.finished
        row["val_dice"] = (
            _validate(net, val_set, cfg, device, amp_dtype) if validate and val_set else ""
        )
        row["seconds"] = round(time.perf_counter() - started, 3)
        rows.append(row)
        log.info("epoch %d: %s", epoch, _format_row(row))
        if ctx.is_main:
            _save_state(state_path, cfg, resumable, rows)
        distributed.barrier(ctx)

    if ctx.is_main:
        save_model(model_path, net, spec, cfg, preset, meta)
        _write_log(log_csv, rows)
        log.info("wrote %s and %s", model_path, log_csv)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dataset(
    lmdb_path: str | Path, cfg: Mapping[str, Any], seed: int, validation: bool
) -> data.PatchDataset:
    """Training patches (oversampled lesions, flips) or a fixed validation set (same every time)."""
    samples = int(cfg["val_samples"]) if validation else int(cfg["samples_per_epoch"])
    if samples == 0:
        samples = covering_samples(lmdb_path, cfg["patch_size"])
    dataset = data.PatchDataset(
        lmdb_path,
        patch_size=tuple(cfg["patch_size"]),
        samples_per_epoch=samples,
        lesion_oversampling=float(cfg["lesion_oversampling"]),
        lesion_centre_fraction=float(cfg["lesion_centre_fraction"]),
        seed=seed,
        flips=bool(cfg["flips"]) and not validation,
        hot_centre_fraction=float(cfg["hot_centre_fraction"]),
        crop_jitter=(0.0, 0.0, 0.0) if validation else tuple(cfg["crop_jitter"]),
        crop_steps=cfg["targets"] == "stepwise" and not validation,
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
    cfg: Mapping[str, Any],
    device: torch.device,
    ctx: distributed.DistContext | None = None,
) -> DataLoader:
    """Batches of `batch_size`; with a DDP rank's `ctx`, that rank's share of each."""
    return data.make_loader(
        dataset,
        int(cfg["batch_size"]),
        int(cfg["num_workers"]),
        pin_memory=device.type == "cuda",
        ctx=ctx,
    )


def _train_epoch(
    net: torch.nn.Module,
    criterion: losses.StepwiseLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    dataset: Any,
    preset: presets.Preset,
    cfg: Mapping[str, Any],
    ctx: distributed.DistContext,
    amp_dtype: torch.dtype | None,
    epoch: int,
) -> dict[str, float]:
    net.train()
    device = ctx.device
    sums: dict[str, float] = {}
    n_batches = 0
    shared: dict[str, torch.Tensor] = {}
    hook = model.last_shared_layer(distributed.unwrap(net)).register_forward_hook(
        lambda _module, _inputs, output: shared.__setitem__("features", output)
    )
    batches = tqdm(
        _loader(dataset, cfg, ctx.device, ctx),
        desc=f"epoch {epoch}",
        leave=False,
        disable=not ctx.is_main,
    )
    for batch in batches:
        image, steps = data.device_batch(batch, device)
        target, regions = _targets(steps, image, preset, cfg)
        small = small_lesion_mask(steps) if float(cfg["small_lesion_dice_weight"]) > 0 else None
        inputs = model.network_inputs(image, bool(cfg["zero_input_channel"]))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            logits = net(inputs.contiguous(memory_format=model.memory_format(device)))
        total, terms = criterion(logits, target, regions, small)
        if not torch.isfinite(total):
            raise TrainingError(
                f"{cfg['name']}-seed{cfg['seed']}: loss is {total.item()} at epoch {epoch}, "
                f"batch {n_batches + 1} (studies {', '.join(batch['study'])}); terms: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            )
        if n_batches == 0:  # once an epoch: what each term asks of the shared features
            sums.update(term_gradient_norms(criterion, terms, shared["features"]))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
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
    steps: torch.Tensor, image: torch.Tensor, preset: presets.Preset, cfg: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Targets for the variant: all preset channels (stepwise) or the lesion mask only (plain)."""
    target = channels.expand(steps, image, preset)
    if cfg["targets"] == "plain":
        return target[:, :1], None
    return target, channel_regions(steps, preset) if cfg["masked_mse"] else None


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
    dataset: Any,
    cfg: Mapping[str, Any],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> float:
    """Dice of channel 0 (sigmoid > 0.5) pooled over a fixed set of validation patches.

    Pooled (2 TP / (2 TP + FP + FN) over all patches) rather than averaged per patch, so that
    lesion-free patches count through their false positives instead of giving Dice 0 or 1.
    """
    net.eval()
    tp = fp = fn = 0.0
    for batch in _loader(dataset, cfg, device):
        image, steps = data.device_batch(batch, device)
        truth = steps == 0
        inputs = model.network_inputs(image, bool(cfg["zero_input_channel"]))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
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
    path: Path, cfg: Mapping[str, Any], resumable: Mapping[str, Any], rows: list[dict[str, Any]]
) -> None:
    state = {
        "format": STATE_FORMAT,
        "settings": dict(cfg),
        **{key: part.state_dict() for key, part in resumable.items()},
        "rng": _rng_state(),
        "rows": rows,
    }
    model.save_atomic(state, path)


def _restore(
    path: Path, cfg: Mapping[str, Any], resumable: Mapping[str, Any], rows: list[dict[str, Any]]
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
    if state.get("format") != STATE_FORMAT or state.get("settings") != dict(cfg):
        log.warning("training state %s is from other settings; starting afresh", path)
        return False
    for key, part in resumable.items():
        part.load_state_dict(state[key])
    rows.extend(state["rows"])
    _set_rng_state(state["rng"])
    return True


def save_model(
    path: str | Path,
    net: torch.nn.Module,
    spec: model.NetworkSpec,
    cfg: Mapping[str, Any],
    preset: presets.Preset,
    meta: Mapping[str, Any],
) -> None:
    """Write `model.pt`: weights plus the settings, target preset and input conventions used."""
    model.save(
        path,
        net,
        spec,
        {
            "settings": dict(cfg),
            "targets": cfg["targets"],
            "target_preset": preset.to_dict(),
            "n_channels": spec.out_channels,
            "patch_size": [int(p) for p in cfg["patch_size"]],
            "zero_input_channel": bool(cfg["zero_input_channel"]),
            "input_channels": ["PET", "CT"],
            "normalisation": json.loads(json.dumps(meta.get("normalisation", {}))),
        },
    )


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
