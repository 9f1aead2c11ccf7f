"""DDP on the CPU (gloo, 2 processes): same result as one process, and resume after a kill.

The training loop below is the pattern `stepseg.train` follows: the global sample order comes from
a seeded generator, `shard` splits each global batch, `wrap` averages gradients (network and
learned loss weights), rank 0 alone writes the checkpoint. It trains the real network factory and
the real step-by-step loss, tiny.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from stepseg import distributed, model, nifti, pack, presets, stepmap, train
from stepseg.atomic import atomic_file
from stepseg.losses import StepwiseLoss
from stepseg.settings import PackSettings, TargetsSettings, TrainSettings

N_SAMPLES = 16
GLOBAL_BATCH = 4
STEPS = 6
PATCH = (8, 8, 8)
NET = TrainSettings.for_variant({"channels": [4, 8], "num_res_units": 1, "norm": "instance"})


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.rand((N_SAMPLES, 2, *PATCH), generator=g)
    lesion = (torch.rand((N_SAMPLES, 1, *PATCH), generator=g) > 0.8).float()
    aux = torch.rand((N_SAMPLES, 1, *PATCH), generator=g)
    return x, torch.cat([lesion, aux], dim=1)


def _train(state_dir: str, kill_after_step: int | None = None) -> dict[str, torch.Tensor]:
    """Train (or resume) STEPS steps; return what the trained model computes on every sample.

    Outputs, not raw weights: a conv bias followed by instance norm has a zero true gradient, and
    Adam turns the float noise of that zero into steps that differ between runs without changing
    anything the network computes.
    """
    torch.set_num_threads(1)
    state_dir = Path(state_dir)
    x_all, y_all = _data()
    with distributed.process_group(torch.device("cpu")) as ctx:
        torch.manual_seed(0)
        net = model.build(model.network_spec(NET, out_channels=2)).to(ctx.device)
        loss_fn = StepwiseLoss(["dicefocal", "mse"], NET)
        optimizer = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=1e-2)
        start = 0
        checkpoint = state_dir / "state.pt"
        if checkpoint.exists():
            state = torch.load(checkpoint, map_location=ctx.device, weights_only=True)
            net.load_state_dict(state["network"])
            loss_fn.load_state_dict(state["loss"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"]
        train_module = distributed.wrap(net, ctx, extras=loss_fn)
        for step in range(start, STEPS):
            order = torch.Generator().manual_seed(1000 + step)
            global_batch = torch.randperm(N_SAMPLES, generator=order)[:GLOBAL_BATCH].tolist()
            mine = distributed.shard(global_batch, ctx)
            total, _ = loss_fn(train_module(x_all[mine]), y_all[mine])
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            logged = distributed.mean_over_ranks(total.item(), ctx)
            if ctx.is_main:
                with atomic_file(checkpoint) as tmp:
                    torch.save(
                        {
                            "network": distributed.unwrap(train_module).state_dict(),
                            "loss": loss_fn.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "step": step + 1,
                        },
                        tmp,
                    )
                with open(state_dir / "log.csv", "a", newline="") as f:
                    csv.writer(f).writerow([step, f"{logged:.8f}"])
            distributed.barrier(ctx)
            if kill_after_step == step + 1 and ctx.rank == 1:
                os._exit(9)  # an abrupt death: no cleanup, no barrier, like SIGKILL
        with torch.no_grad():
            outputs = net(x_all).cpu()
        return {"outputs": outputs, "loss_weights": loss_fn.weighting.params.detach().cpu()}


def _log(state_dir: Path) -> list[tuple[int, float]]:
    with open(state_dir / "log.csv") as f:
        return [(int(step), float(loss)) for step, loss in csv.reader(f)]


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(a["outputs"], b["outputs"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["loss_weights"], b["loss_weights"], rtol=1e-5, atol=1e-6)


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_shard_splits_every_global_batch_into_equal_contiguous_parts():
    ranks = [distributed.DistContext(r, 3, r, torch.device("cpu")) for r in range(3)]
    batch = [9, 4, 7, 1, 0, 3]
    shards = [distributed.shard(batch, ctx) for ctx in ranks]
    assert shards == [[9, 4], [7, 1], [0, 3]]
    with pytest.raises(
        ValueError, match=r"global batch size 5 must be divisible by the number of processes \(3\)"
    ):
        distributed.shard(batch[:5], ranks[0])


def test_rank_batches_are_the_shards_of_the_single_process_batches():
    ranks = [distributed.DistContext(r, 2, r, torch.device("cpu")) for r in range(2)]
    assert distributed.rank_batches(9, 4, ranks[0]) == [[0, 1], [4, 5]]
    assert distributed.rank_batches(9, 4, ranks[1]) == [[2, 3], [6, 7]]  # sample 8 left out
    assert distributed.rank_batches(10, 4, ranks[1]) == [[2, 3], [6, 7], [9]]
    single = distributed.DistContext(0, 1, 0, torch.device("cpu"))
    assert distributed.rank_batches(5, 2, single) == [[0, 1], [2, 3], [4]]


def test_single_process_context_without_torchrun(no_torchrun_env):
    with distributed.process_group(torch.device("cpu")) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
        net = torch.nn.Linear(2, 1)
        assert distributed.wrap(net, ctx) is net
        assert distributed.unwrap(net) is net
        assert distributed.shard([3, 1, 2], ctx) == [3, 1, 2]
        assert distributed.mean_over_ranks(2.5, ctx) == 2.5
        distributed.barrier(ctx)  # a no-op, must not need a process group
    assert not distributed.in_worker()


@pytest.mark.slow  # spawns 2 worker processes that import torch and MONAI (~15 s on 2 cores)
def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path, no_torchrun_env):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir()
    ddp_dir.mkdir()
    single = distributed.launch(1, _train, str(single_dir))
    ddp = distributed.launch(2, _train, str(ddp_dir))
    _assert_same_model(ddp, single)
    # the learned loss weights moved (so the comparison covers them) and stayed in sync
    assert not torch.allclose(single["loss_weights"], torch.ones(2))
    # rank 0 logs the mean loss over ranks = the single-process loss of the global batch
    single_log, ddp_log = _log(single_dir), _log(ddp_dir)
    assert [s for s, _ in ddp_log] == list(range(STEPS))
    for (_, a), (_, b) in zip(single_log, ddp_log, strict=True):
        assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.slow  # 2 launches of 2 workers (~25 s on 2 cores)
def test_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path, no_torchrun_env):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    reference = distributed.launch(1, _train, str(reference_dir))
    with pytest.raises(ChildFailedError):
        distributed.launch(2, _train, str(killed_dir), 3)
    state = torch.load(killed_dir / "state.pt", weights_only=True)
    assert state["step"] == 3  # rank 0's last complete checkpoint, nothing half-written beside it
    assert sorted(p.name for p in killed_dir.iterdir()) == ["log.csv", "state.pt"]
    resumed = distributed.launch(2, _train, str(killed_dir))
    _assert_same_model(resumed, reference)
    assert [s for s, _ in _log(killed_dir)] == list(range(STEPS))


# --- the real training loop (stepseg.train) with `processes: 2` -------------------------------

TRAIN_SETTINGS = {
    "recipe": "paper",
    "channels": [4, 8],
    "num_res_units": 1,
    "norm": "instance",
    "patch_size": [8, 16, 16],
    "batch_size": 4,
    "lr": 1e-3,
    "schedule": "cosine",
    "epochs": 2,
    "samples_per_epoch": 8,
    "val_samples": 4,
    "val_every": 1,
    "device": "cpu",
    # float32: each rank's half batch rounds differently, which bf16's 8 mantissa bits would
    # turn into differences far above the float32 tolerances below
    "amp": "off",
    "name": "stepwise",
    "seed": 0,
    "targets": "stepwise",
}


# the paper preset with one-voxel steps: its own radii would cover patches this small
SMALL = TargetsSettings.from_mapping(
    {"preset": "paper", "steps": [{"semi_axes_mm": [4, 4, 4], "iterations": 1}] * 6 + ["whole"]}
)


@pytest.fixture(scope="module")
def tiny_lmdbs(tmp_path_factory):
    """A packed train split of two studies (one with a lesion) and a val split of one."""
    root = tmp_path_factory.mktemp("cohort")
    affine = np.diag([-4.0, -4.0, 4.0, 1.0])
    out = {}
    for split, studies in {"train": ["A", "B"], "val": ["C"]}.items():
        columns = []
        for i, study in enumerate(studies):
            rng = np.random.default_rng(i)
            shape = (12, 20, 20)
            suv = rng.gamma(2.0, 0.5, shape).astype(np.float32)
            mask = np.zeros(shape, bool)
            if study != "B":
                mask[5:8, 8:13, 8:13] = True
                suv[mask] += 8.0
            ct = rng.normal(0, 100, shape).astype(np.float32)
            steps = stepmap.step_map(
                mask, presets.preset_from_settings(SMALL).voxel_steps((4, 4, 4))
            )
            arrays = (suv, ct, steps)
            paths = [root / study / f"{n}.nii.gz" for n in ("SUV", "CTres", "steps")]
            for path, array in zip(paths, arrays, strict=True):
                nifti.save(nifti.Volume(array, affine), path)
            columns.append(paths)
        out[split] = root / f"{split}.lmdb"
        suv, ctres, steps = (list(col) for col in zip(*columns, strict=True))
        pack.pack_split(
            studies=studies,
            suv_paths=suv,
            ctres_paths=ctres,
            steps_paths=steps,
            out_dir=out[split],
            settings=PackSettings.from_mapping({"codec": "gzip", "tile_shape": [8, 16, 16]}),
            target_settings=SMALL,
        )
    return out


def _train_variant(lmdbs, directory: Path, processes: int) -> tuple[torch.Tensor, list[dict]]:
    settings = TrainSettings.for_variant({**TRAIN_SETTINGS, "processes": processes})
    model_path, log_csv = directory / "model.pt", directory / "train_log.csv"
    train.train_variant(
        train_lmdb=lmdbs["train"],
        val_lmdb=lmdbs["val"],
        model_path=model_path,
        log_csv=log_csv,
        state_dir=directory / "state",
        settings=settings,
        threads=2,
    )
    net, _ = model.load(model_path, torch.device("cpu"))
    probe = torch.rand((2, 2, 8, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = net.eval()(probe)
    with open(log_csv, newline="") as f:
        return outputs, list(csv.DictReader(f))


@pytest.mark.slow  # 2 worker processes train the tiny UNet for 2 epochs (~20 s on 2 cores)
def test_train_variant_with_two_processes_equals_one(tiny_lmdbs, tmp_path, no_torchrun_env):
    single_out, single_log = _train_variant(tiny_lmdbs, tmp_path / "single", 1)
    ddp_out, ddp_log = _train_variant(tiny_lmdbs, tmp_path / "ddp", 2)
    torch.testing.assert_close(ddp_out, single_out, rtol=1e-4, atol=1e-5)
    assert [r["epoch"] for r in ddp_log] == ["1", "2"]
    for a, b in zip(single_log, ddp_log, strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4)
        assert float(b["lr"]) == pytest.approx(float(a["lr"]))
        assert float(b["val_dice"]) == pytest.approx(float(a["val_dice"]), abs=1e-6)
    # rank 0 alone wrote: one model, one log, one state file
    assert sorted(p.name for p in (tmp_path / "ddp" / "state").iterdir()) == ["state.pt"]
