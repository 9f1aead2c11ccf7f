"""Training step time and peak memory: default config on CPU; the paper config on CUDA if present.

First table, per device: the plain variant in float32 with the default memory layout is the
baseline; bf16 autocast and channels_last_3d (alone and together) are reported as its speed-up,
so the gain of `amp: auto` and of `model.memory_format` is measured in the same run. Second
table: the plain variant at the default precision is the baseline; the stepwise variant with the
paper's and the released code's loss recipes is reported as a ratio to it, i.e. what the 7
auxiliary channels cost per step. Random inputs and a random lesion step map (one ellipsoidal
lesion per patch) stand in for LMDB patches, so only compute is measured.

    .venv/bin/python bench/train_step.py [--steps 5] [--warmup 2] [--config config/config.yaml]
    .venv/bin/python bench/train_step.py --paper-only   # the paper geometry only (GPU check)
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from stepseg import losses, model, presets, stepmap, train
from stepseg.settings import RECIPES, TargetsSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]


def batch(patch, batch_size, preset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 2, *patch, generator=gen) * 0.5 + 1.0
    mask = np.zeros((batch_size, *patch), bool)
    zz, yy, xx = np.ogrid[tuple(slice(0, p) for p in patch)]
    centre = [p // 2 for p in patch]
    mask[:] = ((zz - centre[0]) / 3) ** 2 + ((yy - centre[1]) / 6) ** 2 + (
        (xx - centre[2]) / 6
    ) ** 2 <= 1
    on_grid = preset.voxel_steps((3.0, 2.04, 2.04))
    steps = np.stack([stepmap.step_map(m, on_grid) for m in mask])[:, None]
    return image, torch.from_numpy(steps)


def measure(cfg, variant, device, steps, warmup, amp="auto", layout=None):
    """Median seconds per step, patches/s, peak memory (GiB) and parameters of one setting;
    `layout` None = `model.memory_format(device)`."""
    settings = TrainSettings.for_variant({**cfg, "targets": variant})
    preset = presets.preset_from_settings(TargetsSettings())
    channel_losses = list(preset.channel_losses) if variant == "stepwise" else ["dicefocal"]
    spec = model.network_spec(settings, len(channel_losses))
    layout = model.memory_format(device) if layout is None else layout
    net = model.build(spec).to(device, memory_format=layout)
    criterion = losses.StepwiseLoss(channel_losses, settings).to(device)
    optim = torch.optim.Adam([*net.parameters(), *criterion.parameters()], lr=settings.lr)
    amp = model.autocast_dtype(device, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    image, step_maps = batch(settings.patch_size, settings.batch_size, preset)
    image, step_maps = image.to(device), step_maps.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target, regions = train._targets(step_maps, image, preset, settings)
        small = train.small_lesion_mask(step_maps)
        inputs = model.network_inputs(image, settings.zero_input_channel)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=bool(amp)):
            logits = net(inputs.contiguous(memory_format=layout))
        total, _ = criterion(logits, target, regions, small)
        optim.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optim)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    params = sum(p.numel() for p in net.parameters())
    return seconds, settings.batch_size / seconds, memory, params


PRECISIONS = [  # (label, amp, layout): the first row is the baseline
    ("float32, contiguous", "off", torch.contiguous_format),
    ("float32, channels_last_3d", "off", torch.channels_last_3d),
    ("bf16, contiguous", "bf16", torch.contiguous_format),
    ("bf16, channels_last_3d", "bf16", torch.channels_last_3d),
]


def precision_table(cfg, device, args):
    print(f"{'device':6} {'plain variant':28} {'s/step':>8} {'patches/s':>9} {'peak GiB':>8} "
          f"{'speed-up':>8}")  # fmt: skip
    baseline = None
    for label, amp, layout in PRECISIONS:
        if amp == "bf16" and device.type == "cpu" and not model.cpu_supports_bf16():
            print(f"{device.type:6} {label:28} (this CPU has no native bf16)")
            continue
        seconds, rate, memory, _ = measure(
            cfg, "plain", device, args.steps, args.warmup, amp, layout
        )
        baseline = baseline or seconds
        print(f"{device.type:6} {label:28} {seconds:8.3f} {rate:9.2f} {memory:8.2f} "
              f"{baseline / seconds:8.2f}")  # fmt: skip


def variant_table(cfg_path, device, args):
    train_cfg = yaml.safe_load(Path(cfg_path).read_text())["train"]
    rows = [("plain", train_cfg.get("recipe", "paper"))]
    rows += [("stepwise", "paper"), ("stepwise", "released_code")]
    baseline = None
    for variant, recipe in rows:
        cfg = {k: v for k, v in train_cfg.items() if k != "variants"}
        if recipe != cfg.get("recipe", "paper"):
            # the released code's loss terms on the same network and patch
            loss_keys = (
                "lambda_focal",
                "mask_loss_scale",
                "small_lesion_dice_weight",
                "masked_mse",
            )
            cfg.update({k: RECIPES[recipe][k] for k in loss_keys})
        seconds, rate, memory, params = measure(cfg, variant, device, args.steps, args.warmup)
        baseline = baseline or seconds
        print(
            f"{device.type:6} {Path(cfg_path).name:12} {variant + ' / ' + recipe:26} "
            f"{params:>10,} {seconds:8.3f} {rate:9.2f} {memory:8.2f} {seconds / baseline:7.2f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    parser.add_argument("--paper-config", default=str(ROOT / "config" / "paper.yaml"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--paper-only", action="store_true", help="only the paper geometry, on CUDA"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [] if args.paper_only else [("cpu", args.config)]
    if torch.cuda.is_available():
        runs.append(("cuda", args.paper_config))
    for device_name, config_path in runs:
        device = torch.device(device_name)
        cfg = {k: v for k, v in yaml.safe_load(Path(config_path).read_text())["train"].items()}
        cfg.pop("variants")
        print(f"\n{Path(config_path).name}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
              f"channels {cfg['channels']}, {cfg['num_res_units']} residual units")  # fmt: skip
        precision_table(cfg, device, args)
        print(
            f"\n{'device':6} {'config':12} {'variant / recipe':26} {'params':>10} {'s/step':>8} "
            f"{'patches/s':>9} {'peak GiB':>8} {'x plain':>7}"
        )
        variant_table(config_path, device, args)
    if not torch.cuda.is_available():
        print("no CUDA device: the paper config (config/paper.yaml) was not measured")
    print("CPU peak memory is the process's maximum resident set size (all rows so far).")


if __name__ == "__main__":
    main()
