"""Job logs: uncaught errors reach the rule's log, and a rerun keeps the lines of a killed run."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from stepseg import logs
from stepseg.errors import StudyError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("restore_logging")


def test_an_uncaught_error_is_logged_with_type_message_and_wildcards(tmp_path):
    log_path = tmp_path / "logs" / "convert" / "PETCT_1.log"
    with pytest.raises(SystemExit) as exit_info, logs.job(log_path, {"study": "PETCT_1"}):
        raise StudyError("PETCT_1", "SUV has 3 NaN and 0 infinite voxels", "x/SUV.nii.gz")
    assert exit_info.value.code == 1
    text = log_path.read_text()
    assert "INFO stepseg: job (study=PETCT_1) started, process" in text
    assert (
        "ERROR stepseg: job (study=PETCT_1) failed: StudyError: study PETCT_1, file "
        "x/SUV.nii.gz: SUV has 3 NaN and 0 infinite voxels\nTraceback (most recent call last):"
    ) in text
    assert logs.journal_path(log_path).read_text() == text  # kept for the rerun


def test_a_rerun_starts_its_log_with_the_killed_runs_lines(tmp_path):
    log_path = tmp_path / "train" / "plain-seed0.log"
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal\nfrom stepseg import logs\n"
         f"with logs.job({str(log_path)!r}, {{'trained': 'plain-seed0'}}) as log:\n"
         "    log.info('epoch 7 of 40')\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    log_path.unlink()  # what Snakemake does before it runs the job again
    with logs.job(log_path, {"trained": "plain-seed0"}) as log:
        log.info("epoch 8 of 40")
    lines = [line.split(" ", 2)[2] for line in log_path.read_text().splitlines()]
    assert lines[1:] == [
        "INFO stepseg: epoch 7 of 40",
        "INFO stepseg: job (trained=plain-seed0) starts again after an unfinished run "
        "(lines above)",
        lines[3],
        "INFO stepseg: epoch 8 of 40",
        "INFO stepseg: job (trained=plain-seed0) done",
    ]
    assert lines[0].startswith("INFO stepseg: job (trained=plain-seed0) started, process ")
    assert lines[3].startswith("INFO stepseg: job (trained=plain-seed0) started, process ")
    assert not logs.journal_path(log_path).exists()  # done: the next run starts a fresh log
    log_path.unlink()
    with logs.job(log_path, {"trained": "plain-seed0"}):
        pass
    assert "epoch" not in log_path.read_text()


class Namedlist(list):
    """Snakemake's input/output/wildcards lists: by position, by name and as items()."""

    def __init__(self, **named: object) -> None:
        super().__init__(named.values())
        self.__dict__.update(named)

    def items(self):
        return self.__dict__.items()


def test_an_entry_script_logs_its_error_into_the_rule_log(tmp_path):
    """As Snakemake runs it: the failing convert job's log says why, not only an INFO line."""
    log_path = tmp_path / "logs" / "convert" / "PETCT_7.log"
    outputs = {name: tmp_path / f"{name}.nii.gz" for name in ("CT", "PET", "SUV", "CTres", "SEG")}
    snakemake = SimpleNamespace(
        log=Namedlist(log=log_path),
        wildcards=Namedlist(study="PETCT_7"),
        input=Namedlist(raw=tmp_path / "raw" / "PETCT_7"),
        output=Namedlist(**outputs),
        params=SimpleNamespace(settings={"suv_reference_time": "acquisition"}),
        config={},
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "workflow/scripts/convert.py"), {"snakemake": snakemake})
    assert exit_info.value.code == 1
    assert (
        "ERROR stepseg: job (study=PETCT_7) failed: StudyError: study PETCT_7, file "
        f"{tmp_path / 'raw' / 'PETCT_7'}: raw study folder is missing"
    ) in log_path.read_text()
