"""Durable, atomic writes of files and directories: what a crash (kill -9, power loss) may leave.

Everything is written under a temporary name beside its target, fsynced (files, then the
directories holding them), renamed into place, and the parent directory fsynced, so after a
crash the target is the old version or the whole new one, on disk and not just in the page
cache. Temporaries are named after their target: ``.{name}.tmp-*`` while being written,
``.{name}.old-*`` for an old directory moved aside (see `replace_directory`). A killed
writer leaves them behind; `remove_stale_temporaries` clears them (and puts a moved-aside
directory back where its target is missing) — call it before anything reads the folder
again, never while a writer is at work in it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["fsync_directory", "fsync_tree", "remove_stale_temporaries", "replace_directory",
           "temporary_directory_for", "write_text_atomic"]

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[^/]*$")
_RENAME_EXCHANGE = 2  # linux/fs.h: swap the two paths in one step
_AT_FDCWD = -100


def fsync_directory(path: str | os.PathLike) -> None:
    """fsync a directory, so the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every directory bottom-up, ``root`` last: for
    a tree written by code that does not sync (safetensors, tokenizers, ``torch.save``)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(directory)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``.{name}.tmp-*`` beside ``path``, fsync it, ``os.replace``
    it onto ``path`` and fsync the directory: readers see the old file or the whole new one,
    never half of it, and the new one survives a power loss once this returns."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def temporary_directory_for(target: str | os.PathLike) -> Path:
    """A new empty directory ``.{name}.tmp-*`` beside ``target`` (created, with the parent),
    to write a tree in before `replace_directory` moves it onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the platform, the C library or the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory ``source`` onto ``target`` (same filesystem), replacing a
    directory already there, then delete the old one.

    ``source`` is fsynced first (`fsync_tree`), the parent after. Where ``target`` exists, on
    Linux one ``renameat2(RENAME_EXCHANGE)`` swaps the two, so ``target`` names a whole
    directory, old or new, at every instant (``os.replace`` cannot: it refuses a non-empty
    directory). Where the exchange is unavailable the old one is renamed aside to
    ``.{name}.old-*`` before the new one is renamed in; a crash between those two renames
    leaves no ``target`` but the old one aside, which `remove_stale_temporaries` puts back.
    """
    source, target = Path(source), Path(target)
    fsync_tree(source)
    if not target.exists():
        os.rename(source, target)
        fsync_directory(target.parent)
        return
    if _exchange(source, target):
        fsync_directory(target.parent)
        shutil.rmtree(source, ignore_errors=True)  # the old one now; a crash leaves a .tmp-*
        return
    aside = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, aside)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(aside, target)
        raise
    fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Clear what killed writers left in ``directory``: ``.{name}.tmp-*`` files and trees
    are deleted; a ``.{name}.old-*`` directory is renamed back to ``name`` when ``name`` is
    missing (a crash mid-`replace_directory`), else deleted. Returns one line per action.
    Tolerates a peer process doing the same at once (what it already removed is skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    actions = []
    for entry in sorted(directory.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None:
            continue
        target = directory / match["name"]
        try:
            if match["kind"] == "old" and entry.is_dir() and not target.exists():
                os.rename(entry, target)
                actions.append(f"restored {target} from {entry.name}")
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        actions.append(f"removed {entry}")
    if actions:
        fsync_directory(directory)
    return actions
