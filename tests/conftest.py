"""Shared fixtures, and the optional checks: tests that need something outside the Python
environment (a SLURM controller, dcm2niix, dicom3tools' dciodvfy, a CUDA GPU).

Such a test is marked `requires("<name>")` (`cuda` for the GPU) and skips where the thing is
missing, unless the environment variable STEPSEG_REQUIRE (comma-separated names; .ci/run sets it)
names it: then the missing thing fails the test instead, so a CI run cannot pass by skipping.
The terminal summary says which optional checks ran, failed, skipped and why.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_VARIABLE = "STEPSEG_REQUIRE"


def _missing_tool(name: str, package: str) -> str | None:
    if shutil.which(name) is None:
        return f"{name} is not installed (Debian package {package}; .ci/run installs it)"
    return None


def slurm_unreachable() -> str | None:
    """Why no SLURM controller answers (None when one does)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools (sinfo, sbatch) are not installed: run `make slurm-up` first"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        return "sinfo got no answer from a SLURM controller within 20 s: run `make slurm-up`"
    if result.returncode != 0:
        last_error = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return f"sinfo cannot reach a SLURM controller ({last_error}): run `make slurm-up`"
    if not result.stdout.strip():
        return "the SLURM controller has no node: run `make slurm-up`"
    return None


def _no_cuda() -> str | None:
    import torch  # only for the tests that ask

    return None if torch.cuda.is_available() else "needs a CUDA GPU"


# name -> why it is unavailable here (None: available)
OPTIONAL_CHECKS = {
    "slurm": slurm_unreachable,
    "dcm2niix": lambda: _missing_tool("dcm2niix", "dcm2niix"),
    "dciodvfy": lambda: _missing_tool("dciodvfy", "dicom3tools"),
    "cuda": _no_cuda,
}


@functools.cache
def unavailable(name: str) -> str | None:
    """Why the optional check `name` cannot run here (asked once per session)."""
    return OPTIONAL_CHECKS[name]()


def required() -> set[str]:
    """The optional checks that STEPSEG_REQUIRE turns from skips into failures."""
    names = {n.strip() for n in os.environ.get(REQUIRE_VARIABLE, "").split(",") if n.strip()}
    unknown = names - set(OPTIONAL_CHECKS)
    if unknown:
        raise pytest.UsageError(
            f"{REQUIRE_VARIABLE} names unknown checks {sorted(unknown)}; "
            f"known: {', '.join(OPTIONAL_CHECKS)}"
        )
    return names


def optional_checks_of(item: pytest.Item) -> list[str]:
    names = [m.args[0] for m in item.iter_markers("requires")]
    if item.get_closest_marker("cuda") is not None:
        names.append("cuda")
    for name in names:
        if name not in OPTIONAL_CHECKS:
            raise pytest.UsageError(f"{item.nodeid}: unknown requires({name!r})")
    return names


def pytest_configure(config: pytest.Config) -> None:
    required()  # a misspelt name stops the run before any test


def pytest_runtest_setup(item: pytest.Item) -> None:
    """An optional check runs where its tool is present; otherwise it skips, or fails when
    STEPSEG_REQUIRE names it."""
    for name in optional_checks_of(item):
        reason = unavailable(name)
        if reason is None:
            continue
        if name in required():
            pytest.fail(f"{REQUIRE_VARIABLE} requires {name}, but {reason}", pytrace=False)
        pytest.skip(reason)


_selected: dict[str, list[str]] = defaultdict(list)  # check -> node ids of the selected tests
_outcomes: dict[str, Counter] = defaultdict(Counter)


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:  # after -m / -k deselection
        for name in optional_checks_of(item):
            _selected[name].append(item.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    names = [n for n, ids in _selected.items() if report.nodeid in ids]
    if not names:
        return
    if report.when == "call" or report.skipped:
        outcome = report.outcome  # passed / failed in the test itself, or skipped
    elif report.failed:
        outcome = f"errors in {report.when}"  # e.g. a required tool missing
    else:
        return
    for name in names:
        _outcomes[name][outcome] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per optional check: ran (passed / failed), skipped and why, or not selected."""
    names = required()
    terminalreporter.section("optional checks")
    terminalreporter.write_line(
        f"{REQUIRE_VARIABLE}={','.join(sorted(names)) or '(unset: missing tools skip)'}"
    )
    for name in OPTIONAL_CHECKS:
        outcomes = _outcomes.get(name)
        if name not in _selected:
            line = "not selected"
        elif not outcomes:
            line = "selected, not run"
        else:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
            ran = outcomes["passed"] + outcomes["failed"] > 0
            line = ("RAN: " if ran else "DID NOT RUN: ") + counts
            reason = unavailable(name) if "skipped" in outcomes else None
            if reason:
                line += f" ({reason})"
        terminalreporter.write_line(f"{name:>9}: {line}")


@pytest.fixture(scope="session")
def tiny_synthetic_settings() -> dict:
    """The default synthetic-cohort settings on a coarse, small grid: a study in about a second."""
    settings = yaml.safe_load((ROOT / "config/config.yaml").read_text())["download"]["synthetic"]
    return {
        **settings,
        "n_patients": 4,
        "pet_shape": [48, 40, 40],
        "pet_spacing_mm": [12.0, 13.0, 13.0],
        "ct_shape": [60, 64, 64],
        "ct_spacing_mm": [9.6, 8.0, 8.0],
    }


@pytest.fixture(scope="session")
def micro_synthetic_settings() -> dict:
    """A three-patient synthetic cohort on a very coarse grid, for tests of sources and servers."""
    return {
        "seed": 1,
        "n_patients": 3,
        "repeat_fraction": 0.5,
        "lesion_fraction": 0.5,
        "pet_shape": [24, 20, 20],
        "pet_spacing_mm": [12.0, 13.0, 13.0],
        "ct_shape": [30, 32, 32],
        "ct_spacing_mm": [9.6, 8.0, 8.0],
    }


@pytest.fixture
def restore_logging():
    """Undo what `stepseg.logs.setup` does to the root logger of the test process (handlers on
    files and on the stderr capture of one test)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A folder on its own 256 KiB tmpfs: a real file system that runs out of space, unmounted
    afterwards. Mounting needs root; elsewhere the test skips, saying so."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            check=False,
        )
        reason = done.stderr.strip() if done.returncode else ""
    except OSError as exc:
        reason = str(exc)
    if reason:
        pytest.skip(f"no small file system to fill: mounting a tmpfs failed (needs root): {reason}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def full_disk(small_disk) -> Path:
    """`small_disk` filled with zeros to its last block: any write into a new file fails with
    ENOSPC (creating an empty file still works: tmpfs counts inodes apart)."""
    block = bytes(4096)
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return small_disk
