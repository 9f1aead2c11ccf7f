"""GPU claims: one card per job via lock files, released even when the job is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stepseg import devices


@pytest.fixture
def no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_installed_gpus_reads_only_numbered_device_nodes(tmp_path):
    for name in ["nvidia1", "nvidia0", "nvidia10", "nvidiactl", "nvidia-uvm", "nvidia-caps"]:
        (tmp_path / name).touch()
    assert devices.installed_gpus(tmp_path) == [0, 1, 10]


def test_jobs_get_different_cards_and_a_third_waits(tmp_path, no_visible_devices):
    def claim(count: int, timeout_s: float = 3600.0):
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # each claim as a separate job process sees it
        return devices.claimed_gpus(count, gpus=[0, 1], lock_dir=tmp_path, timeout_s=timeout_s)

    with claim(1) as first:
        assert first == [0]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        with claim(1) as second:
            assert second == [1]
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        with (
            pytest.raises(TimeoutError, match=r"no 2 free GPU\(s\) among \[0, 1\] within 0 s"),
            claim(2, timeout_s=0),
        ):
            pass
        # the failed claim of 2 cards kept none: card 1 is still free
        with claim(1, timeout_s=0) as third:
            assert third == [1]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with claim(2, timeout_s=0) as both:
        assert both == [0, 1]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_killed_job_frees_its_card(tmp_path, no_visible_devices):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from stepseg import devices\n"
            f"with devices.claimed_gpus(1, gpus=[0], lock_dir=Path({str(tmp_path)!r})):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(TimeoutError),
            devices.claimed_gpus(1, gpus=[0], lock_dir=tmp_path, timeout_s=0),
        ):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        start = time.monotonic()
        with devices.claimed_gpus(1, gpus=[0], lock_dir=tmp_path, timeout_s=5, poll_s=0.1) as got:
            assert got == [0]
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_scheduler_choice_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with devices.claimed_gpus(1, gpus=[0, 1], lock_dir=tmp_path) as got:
        assert got == []
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert list(tmp_path.iterdir()) == []


def test_zero_gpus_hides_every_card_and_no_card_means_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with devices.claimed_gpus(1, gpus=[], lock_dir=tmp_path) as got:
        assert got == []
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with devices.claimed_gpus(0, gpus=[0], lock_dir=tmp_path) as got:
        assert got == []
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_more_cards_than_installed_is_an_error(tmp_path, no_visible_devices):
    with (
        pytest.raises(ValueError, match="2 GPUs requested but this machine has 1"),
        devices.claimed_gpus(2, gpus=[0], lock_dir=tmp_path),
    ):
        pass
