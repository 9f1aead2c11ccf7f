"""Write-then-rename helpers: a killed job never leaves an output that looks complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    Path(name).chmod(0o666 & ~_umask())
    return Path(name)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the suffixes (`.nii.gz`, `.csv`) so writers that infer the format
    from the extension still work.
    """
    target = Path(path)
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
    tmp = _temp_sibling(target, directory=True)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
