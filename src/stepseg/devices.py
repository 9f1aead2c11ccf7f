"""Which GPU(s) a job may use when several GPU jobs run on one machine.

Snakemake's `gpu` resource limits how many GPU jobs run at once, but it does not say *which* card
each job gets, so without help every job would pick cuda:0. `claimed_gpus(n)` gives the job n cards
of its own: it takes an exclusive lock file per card (`gpu<k>.lock` in a lock directory shared by
all jobs of the machine) and sets CUDA_VISIBLE_DEVICES to the cards it holds. The kernel drops the
locks when the process ends, however it ends, so a killed job never leaves a card marked busy.

Where a scheduler already chose the cards (SLURM sets CUDA_VISIBLE_DEVICES for `--gpus` jobs) or
the user did, that choice is kept and nothing is locked. Call it before CUDA is first used (before
`torch.cuda.*`): CUDA reads CUDA_VISIBLE_DEVICES once, at initialisation.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "STEPSEG_GPU_LOCK_DIR"


def installed_gpus(dev_dir: Path = Path("/dev")) -> list[int]:
    """Indices of the NVIDIA cards of this machine, from /dev/nvidia<k> (no CUDA initialisation)."""
    indices = []
    for entry in dev_dir.glob("nvidia*"):
        match = re.fullmatch(r"nvidia(\d+)", entry.name)
        if match:
            indices.append(int(match.group(1)))
    return sorted(indices)


def default_lock_dir() -> Path:
    """One directory per machine and user that every job of the workflow agrees on."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"stepseg-gpu-locks-{os.getuid()}"


def _try_lock(path: Path) -> IO[str] | None:
    handle = open(path, "a+")  # noqa: SIM115 (kept open: the lock lives as long as the handle)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextmanager
def claimed_gpus(
    count: int,
    *,
    gpus: list[int] | None = None,
    lock_dir: Path | None = None,
    timeout_s: float = 3600.0,
    poll_s: float = 2.0,
) -> Iterator[list[int]]:
    """Hold `count` free cards of this machine for the block; CUDA_VISIBLE_DEVICES names them.

    Yields the physical card indices held (in CUDA order: inside the block they are cuda:0..n-1).
    Yields [] and leaves the environment alone when CUDA_VISIBLE_DEVICES is already set or the
    machine has no card (CPU run), and hides every card (CUDA_VISIBLE_DEVICES="") for `count` 0,
    so a job told to use no GPU cannot take one by accident. Waits up to `timeout_s` while other
    jobs hold the cards (Snakemake's `gpu` resource normally makes that wait zero), then raises
    TimeoutError. `gpus` overrides the detected cards (tests, or a subset reserved for stepseg).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        yield []
        return
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        log.info("keeping CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])
        yield []
        return
    available = installed_gpus() if gpus is None else sorted(gpus)
    if not available:
        log.info("no GPU on this machine: running on the CPU")
        yield []
        return
    if count > len(available):
        raise ValueError(f"{count} GPUs requested but this machine has {len(available)}")
    directory = default_lock_dir() if lock_dir is None else Path(lock_dir)
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with ExitStack() as held:
        while True:
            claimed: list[int] = []
            for index in available:
                handle = _try_lock(directory / f"gpu{index}.lock")
                if handle is not None:
                    held.callback(handle.close)
                    claimed.append(index)
                    if len(claimed) == count:
                        break
            if len(claimed) == count:
                break
            held.close()  # never sit on a partial claim while waiting: two jobs could deadlock
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no {count} free GPU(s) among {available} within {timeout_s:.0f} s "
                    f"(locks in {directory})"
                )
            time.sleep(poll_s)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in claimed)
        log.info("claimed GPU(s) %s", os.environ["CUDA_VISIBLE_DEVICES"])
        try:
            yield claimed
        finally:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
