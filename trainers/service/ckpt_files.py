"""A checkpoint's files: every save is a new version directory; the checkpoint's path is a link.

A name may be saved again (hpcai's math_rl overwrites its sampler weights
``current_training_step`` every step), while the backends cache loaded sampler weights by
directory. So a save never rewrites a directory: it writes ``<name>@v<N>`` whole, atomically
points the link ``<name>`` at it and removes the version it replaced. Whatever reads the
checkpoint through its link later reads the newest save (the scheduler thread runs requests
one at a time, so none is reading the old version then), and a cache keyed by the resolved
directory never mistakes one save for another. ``@`` is not allowed in checkpoint names, so
versions, temporaries and archives never collide with another checkpoint's link. A version's
download archive (``<version>.tar.gz``) lives and dies with the version.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path


def current(link: Path) -> Path:
    """The directory the checkpoint's newest save is in."""
    return Path(link).resolve()


def archive_path(version: Path) -> Path:
    return version.with_name(version.name + ".tar.gz")


def write(link: Path, version: int, save: Callable[[Path], None]) -> Path:
    """``save(dir)`` writes the files; they become the checkpoint's newest version ``version``
    (a sequence number of the model: re-running a save after a crash rewrites the same one)."""
    link = Path(link)
    target = link.with_name(f"{link.name}@v{version}")
    tmp = target.with_name(target.name + ".tmp")
    for stale in (tmp, target):
        shutil.rmtree(stale, ignore_errors=True)
    archive_path(target).unlink(missing_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    save(tmp)
    tmp.rename(target)
    old = current(link) if link.is_symlink() else None
    if link.is_dir() and not link.is_symlink():  # a checkpoint written before versions existed
        shutil.rmtree(link)
    staged = link.with_name(link.name + "@link")
    staged.unlink(missing_ok=True)
    staged.symlink_to(target.name)
    os.replace(staged, link)
    if old is not None and old != target:
        _remove_version(old)
    return target


def remove(link: Path) -> None:
    """Deletes the checkpoint's files (its link and newest version)."""
    link = Path(link)
    if link.is_symlink():
        _remove_version(current(link))
        link.unlink()
    else:
        shutil.rmtree(link, ignore_errors=True)


def _remove_version(version: Path) -> None:
    shutil.rmtree(version, ignore_errors=True)
    archive_path(version).unlink(missing_ok=True)


def write_archive(version: Path, export: Callable[[Path], None]) -> Path:
    """``export(dir)`` writes the files to download; they are packed as the version's
    ``.tar.gz`` (written under a temporary name, then renamed)."""
    staging = version.with_name(version.name + ".export")
    shutil.rmtree(staging, ignore_errors=True)
    export(staging)
    target = archive_path(version)
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            tar.add(file, arcname=file.relative_to(staging).as_posix())
    shutil.rmtree(staging)
    tmp.rename(target)
    return target
