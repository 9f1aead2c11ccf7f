"""Data-parallel training on several GPUs of one node (PyTorch DDP), and its single-process twin.

One training loop serves both cases. It draws the *global* sample order from its seeded generator
exactly as a single process would, then each rank takes its contiguous share of every global
batch (`shard`); DDP averages the gradients, so with equal per-rank shares the update equals the
single-process update on the whole global batch (up to float summation order), provided the loss
is a mean of per-sample terms and normalisation is per sample (instance norm) or synchronised
(`wrap` turns BatchNorm into SyncBatchNorm on CUDA). Checkpoints and logs are written by rank 0
only, then `barrier` lets every rank read them; a killed run resumes from rank 0's last checkpoint
like a single-process run.

Without `WORLD_SIZE` in the environment (no torchrun) every helper degrades to a no-op, so the loop
needs no `if distributed:` branches. `launch(n, fn, ...)` starts `fn` in n processes with torch's
elastic launcher (the engine of `torchrun --standalone`), so a Snakemake job needs no wrapper.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

T = TypeVar("T")

# A rank waits this long for the others (rendezvous, barriers, all-reduce) before failing: long
# enough for rank 0 to write a checkpoint of the paper's network, short enough that a dead peer
# fails the job instead of hanging it until SLURM's time limit.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, logs and the model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def in_worker() -> bool:
    """True inside a process started by torchrun or `launch` (it must not launch again)."""
    return "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The rank's own GPU (cuda:LOCAL_RANK among the visible ones) when training on GPUs."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"rank with LOCAL_RANK={local_rank} has no GPU: only {torch.cuda.device_count()} "
            f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device: torch.device) -> Iterator[DistContext]:
    """Join the process group that torchrun / `launch` described in the environment.

    `device` is where training runs (`stepseg.model.resolve_device`); on GPUs each rank takes its
    own, cuda:LOCAL_RANK. NCCL on GPUs, gloo on the CPU. On leaving, all ranks meet at a barrier
    (so none exits while rank 0 still writes) and the group is destroyed; on an error the group is
    only destroyed, so the launcher sees the failure instead of a hang. Without `WORLD_SIZE` > 1
    nothing is initialised and the context describes a single process on `device`.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        yield DistContext(0, 1, 0, device)
        return
    ctx = DistContext(rank, world_size, local_rank, _rank_device(device, local_rank))
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=ctx.device if backend == "nccl" else None,
    )
    log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, ctx.device)
    try:
        yield ctx
        barrier(ctx)
    finally:
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. after rank 0 wrote a checkpoint the others will read)."""
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def shard(global_batch: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's contiguous share of one global batch of sample indices.

    Every rank passes the same global batch (drawn from the same seeded generator), so the union of
    the shards is exactly what a single process would train on, in the same order.
    """
    size = len(global_batch)
    if size % ctx.world_size:
        raise ValueError(
            f"the global batch size {size} must be divisible by the number of processes "
            f"({ctx.world_size}) so that every rank trains on the same number of samples"
        )
    per_rank = size // ctx.world_size
    return list(global_batch[ctx.rank * per_rank : (ctx.rank + 1) * per_rank])


def rank_batches(n_samples: int, global_batch_size: int, ctx: DistContext) -> list[list[int]]:
    """This rank's share of every global batch of the sample indices 0..n-1, in order.

    A DataLoader's `batch_sampler`: the single-process loader takes batches of
    `global_batch_size` consecutive indices; here each rank takes its `shard` of each of them. A
    last, partial global batch that does not split evenly is left out on every rank.
    """
    batches = []
    for start in range(0, n_samples, global_batch_size):
        batch = list(range(start, min(start + global_batch_size, n_samples)))
        if len(batch) % ctx.world_size:
            log.warning(
                "leaving out the last %d of %d samples: they do not split over %d processes",
                len(batch), n_samples, ctx.world_size,
            )  # fmt: skip
            continue
        batches.append(shard(batch, ctx))
    return batches


class _WithExtras(nn.Module):
    """The network plus modules trained alongside it (learned loss weights), for one DDP wrapper.

    DDP averages the gradient of every parameter it holds, wherever the parameter is used in the
    graph; wrapping the loss module too keeps its learned weights identical on all ranks.
    """

    def __init__(self, network: nn.Module, extras: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.extras = extras

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.network(*args, **kwargs)


def wrap(network: nn.Module, ctx: DistContext, extras: nn.Module | None = None) -> nn.Module:
    """The module to call in the training step: DDP over `network` (and `extras`) when distributed.

    `network` must already be on `ctx.device`. Call the returned module like the network; save and
    load weights through `unwrap(...)`, so checkpoints are the same with and without DDP.
    BatchNorm becomes SyncBatchNorm on CUDA (statistics over the global batch, as in a single
    process); gloo has no SyncBatchNorm, so on the CPU BatchNorm statistics stay per rank.
    """
    if not ctx.distributed:
        return network
    if ctx.device.type == "cuda":
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        log.warning("BatchNorm on CPU ranks: batch statistics are per rank, not global")
    module = network if extras is None else _WithExtras(network, extras)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside whatever `wrap` returned (for state_dict / load_state_dict)."""
    if isinstance(module, DistributedDataParallel):
        module = module.module
    if isinstance(module, _WithExtras):
        module = module.network
    return module


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """The mean of a per-rank scalar (e.g. the batch loss), so rank 0 logs the global value."""
    if not ctx.distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / ctx.world_size


def launch(nprocs: int, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in `nprocs` processes on this node (DDP); return rank 0's result.

    `nprocs` <= 1 calls `fn` in this process. Otherwise torch's elastic launcher (what
    `torchrun --standalone` runs) spawns the workers with RANK, WORLD_SIZE, LOCAL_RANK and a free
    rendezvous port on 127.0.0.1; `fn` must be importable (a module-level function) and enters
    `process_group()`. No restarts: a failed worker fails the job, Snakemake's retry resumes it
    from the last checkpoint. Raises torch's `ChildFailedError` naming the failed rank.
    """
    if nprocs <= 1:
        return fn(*args)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"stepseg-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        local_addr="127.0.0.1",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    results = elastic_launch(config, fn)(*args)
    return results[0]
