"""Seconds per whole-body study of sliding-window inference on CPU.

Geometries: the default synthetic cohort's PET grid (config/config.yaml) and the real autoPET grid
(400 x 400 x 326 voxels at 2.04 x 2.04 x 3 mm). Both use the DEFAULT config's network and patch
size with random weights (the paper network on CPU at the real geometry would take hours); the
first row is the baseline of the ratio column.

    .venv/bin/python bench/infer.py [--threads 2] [--real-shape 326 400 400] [--skip-tta]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from stepseg import infer, model, nifti, presets
from stepseg.settings import InferSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]


def volumes(shape, spacing, seed=0):
    rng = np.random.default_rng(seed)
    suv = rng.gamma(2.0, 0.7, shape).astype(np.float32)
    ct = rng.normal(0.0, 200.0, shape).astype(np.float32)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return nifti.Volume(suv, affine), nifti.Volume(ct, affine)


def save_random_model(train_config: dict, path: Path) -> model.NetworkSpec:
    """The stepwise variant's network of `train_config` with seeded random weights, saved as a
    trained model: inference costs the same whatever the weights."""
    settings = TrainSettings.for_variant(train_config, "stepwise", 0)
    spec = model.network_spec(settings, out_channels=8)
    torch.manual_seed(0)
    info = model.ModelInfo(settings=settings, network=spec, target_preset=presets.PAPER.to_dict())
    model.save(path, model.build(spec), info)
    return spec


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-shape", type=int, nargs=3, default=[326, 400, 400])
    parser.add_argument("--skip-tta", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text())
    settings = TrainSettings.for_variant(config["train"], "stepwise", 0)
    infer_settings = InferSettings.from_mapping(config["infer"])
    synthetic = config["download"]["synthetic"]
    cases = [
        ("default", synthetic["pet_shape"], synthetic["pet_spacing_mm"], False),
        ("default", synthetic["pet_shape"], synthetic["pet_spacing_mm"], True),
        ("autoPET", args.real_shape, [3.0, 2.04, 2.04], False),
    ]
    if args.skip_tta:
        cases = [c for c in cases if not c[3]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        spec = save_random_model(config["train"], path)
        print(
            f"network: channels {list(spec.channels)}, {spec.num_res_units} residual units, "
            f"patch {list(settings.patch_size)}, overlap {infer_settings.overlap}, "
            f"{args.threads} threads (the default config's network at both geometries)"
        )
        print(f"{'geometry':9} {'shape (z,y,x)':16} {'flip TTA':8} {'s/study':>8} {'x first':>7}")
        baseline = None
        for name, shape, spacing, tta in cases:
            suv, ct = volumes(tuple(shape), spacing)
            start = time.perf_counter()
            mask = infer.predict_volume(
                path, suv, ct, dataclasses.replace(infer_settings, flip_tta=tta), "cpu"
            )
            seconds = time.perf_counter() - start
            assert mask.shape == tuple(shape)
            baseline = baseline or seconds
            print(
                f"{name:9} {'x'.join(map(str, shape)):16} {tta!s:8} {seconds:8.2f} "
                f"{seconds / baseline:7.2f}"
            )


if __name__ == "__main__":
    main()
