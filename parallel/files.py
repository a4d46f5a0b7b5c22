"""Durable file writes: a reader never sees a partial file, and a crash never loses a written one.

``atomic_write`` writes beside the target, fsyncs, renames over it and fsyncs the folder;
``file_entry`` is a checkpoint manifest's record of a file (size and sha256), computed by
whoever wrote the file (each training rank hashes its own shard).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp_path)``, fsync, then rename over ``path``: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest entry: the file's size and sha256."""
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
