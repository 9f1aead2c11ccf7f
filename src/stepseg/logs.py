"""Logging set-up for entry scripts: everything goes to the rule's log file and to stderr.

`job` wraps an entry script's work so that the reason a job failed reaches its log: Snakemake
says "check log file(s) for error details", and on a cluster or with many parallel jobs the
terminal is not where anyone looks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def setup(
    log_path: str | Path | None, level: int = logging.INFO, journal: Path | None = None
) -> logging.Logger:
    """Route the root logger (and warnings) to `log_path` (appended to), `journal` and stderr;
    return the stepseg logger."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    for path in (log_path, journal):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(path, mode="a"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    return logging.getLogger("stepseg")


def journal_path(log_path: str | Path) -> Path:
    """Where a job's log lines are kept, beside its log, until the job succeeds."""
    log_path = Path(log_path)
    return log_path.with_name(f".{log_path.name}.unfinished")


@contextmanager
def job(log_path: str | Path, context: Mapping[str, str]) -> Iterator[logging.Logger]:
    """Run an entry script's work with logging set up; an exception is logged with its type,
    message and traceback and the job's `context` (its wildcards), then the process exits 1.

    Snakemake deletes a job's log before it runs the job again, which would erase the lines of a
    killed or failed run (e.g. the epochs before a training was killed). They are also written to
    a hidden journal (`journal_path`) that only a successful run removes; a rerun starts its log
    with them.
    """
    log_path = Path(log_path)
    journal = journal_path(log_path)
    earlier = journal.read_text() if journal.is_file() else ""
    if earlier and not (log_path.is_file() and log_path.stat().st_size):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(earlier)
    log = setup(log_path, journal=journal)
    where = ", ".join(f"{key}={value}" for key, value in context.items()) or "no wildcards"
    if earlier:
        log.info("job (%s) starts again after an unfinished run (lines above)", where)
    log.info("job (%s) started, process %d", where, os.getpid())
    try:
        yield log
    except Exception as exc:
        log.error("job (%s) failed: %s: %s", where, type(exc).__name__, exc, exc_info=exc)
        _close_files()
        raise SystemExit(1) from None
    except BaseException as exc:  # interrupted (Ctrl-C, SIGTERM turned into SystemExit, ...)
        log.error("job (%s) stopped: %s %s", where, type(exc).__name__, exc)
        _close_files()
        raise
    log.info("job (%s) done", where)
    _close_files()
    journal.unlink(missing_ok=True)


def _close_files() -> None:
    """Detach and close the log files: the journal is complete before it is kept or removed, and
    nothing logged later (at interpreter exit) reopens it."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
