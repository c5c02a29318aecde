"""Atomic writes: a killed process leaves the previous output or none, never half of one."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in two renames.

    Between the two renames the old folder sits at ``<path>.old``; a crash in that
    instant leaves it there intact, and the next write removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed earlier write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MEASURED_DIGITS = 4  # significant digits kept of a float measured through float32 model passes


def significant(value: float, digits: int = MEASURED_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits.

    A float32 forward sums in an order that depends on the thread count, so a measured error differs in its
    last bits between two hosts. Written at full precision, those bits change the file's bytes (and so a
    DVC hash) though nothing measured changed. At 4 digits, the two runs write the same bytes unless a value
    lies within that last-bit noise (about 1e-7 relative) of a rounding boundary.
    """
    value = float(value)
    if value == 0.0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))
