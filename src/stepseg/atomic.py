"""Write-then-rename helpers: a killed job never leaves an output that looks complete, and its
rerun leaves no temp file behind.

A temp lives beside its target and is named `.<target name>.stepseg-tmp-<pid>-<random>`, plus the
target's suffixes for a file (`.CT.nii.gz.stepseg-tmp-4711-k2j8x0qa.nii.gz`, a directory
`.val.lmdb.stepseg-tmp-4711-3bd0c1aw`). Before it writes a target, a job removes that target's
temps left by a killed earlier writer (`_remove_stale_temps`): Snakemake never runs two jobs with
the same output, on one machine or on a cluster (and its lock keeps a second Snakemake out of the
working directory), so a temp of the target being written is never another job's live one; the
temps of other targets in the same folder, other jobs' live writes among them, are left alone.
The pid tells a reader which process wrote a temp; it is never checked for liveness (on a cluster
it may be another node's).

A write that fails for lack of space raises `NoSpaceError`, naming the target: the OS error
(`[Errno 28] No space left on device`) names no file.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_MARK = ".stepseg-tmp-"
_TEMP_NAME = re.compile(rf"\..+{re.escape(TEMP_MARK)}[0-9]+-")
# out of space on the file system, or of the user's quota on it (common on clusters)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class NoSpaceError(OSError):
    """A write that failed because the disk or the quota is full, naming its output."""

    def __init__(self, code: int, target: str | Path) -> None:
        self.target = Path(target)
        super().__init__(
            code, f"{os.strerror(code)} while writing {self.target}: the disk or quota may be full"
        )


def _temp_prefix(path: Path) -> str:
    """The start of the names of `path`'s temps (they sit in `path`'s folder)."""
    return f".{path.name}{TEMP_MARK}"


def _remove_stale_temps(path: Path) -> None:
    """Delete the temps of `path` that a killed writer left (`path`'s folder exists)."""
    prefix = _temp_prefix(path)
    for temp in sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix)):
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp)
        else:
            temp.unlink(missing_ok=True)
        log.info("removed %s, left by a killed earlier write of %s", temp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_sibling(path: Path, directory: bool) -> Path:
    """A private temporary beside `path`, given the permissions a plain open()/mkdir() would give.

    mkstemp/mkdtemp create 0600/0700 entries; left so, outputs renamed into place would be
    unreadable to the rest of a group sharing results/ on a cluster.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    prefix = f"{_temp_prefix(path)}{os.getpid()}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    Path(name).chmod(0o666 & ~_umask())
    return Path(name)


@contextmanager
def _naming_no_space(target: Path) -> Iterator[None]:
    """Raise an out-of-space error inside the block again as a `NoSpaceError` naming `target`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        raise NoSpaceError(exc.errno, target) from exc


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the suffixes (`.nii.gz`, `.csv`) so writers that infer the format
    from the extension still work. A `path` that is itself a temp (an outer `atomic_file`'s, e.g.
    `nifti.save` into it) is yielded as it is: it is private already, and a temp of a temp would
    carry a name that no rerun recognises as its target's.
    """
    target = Path(path)
    if _TEMP_NAME.match(target.name):
        yield target
        return
    with _naming_no_space(target):
        tmp = _temp_sibling(target, directory=False)
        try:
            yield tmp
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    target = Path(path)
    with _naming_no_space(target):
        tmp = _temp_sibling(target, directory=True)
        try:
            yield tmp
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
