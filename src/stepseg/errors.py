"""One error type for bad input, so every stage names the study and the file the same way."""

from __future__ import annotations

from pathlib import Path


class StudyError(RuntimeError):
    """Bad input for one study: the message always names the study and, when known, the file."""

    def __init__(self, study: str, message: str, path: str | Path | None = None) -> None:
        self.study = study
        self.path = None if path is None else Path(path)
        where = f"study {study}" + (f", file {self.path}" if self.path is not None else "")
        super().__init__(f"{where}: {message}")
