"""The cache under ``$ZOTUNE_CACHE`` (or ``~/.cache/zotune``): where it is, checksums, disk
space and disk errors, and the progress lines of long fetches. Below every asset user."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import shutil
import sys

from zotune.errors import UserError

CACHE_ENV = "ZOTUNE_CACHE"


def cache_dir() -> pathlib.Path:
    """``$ZOTUNE_CACHE`` or ``~/.cache/zotune``, created if missing."""
    root = pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "zotune").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache folder {root} ({e.strerror}): set {CACHE_ENV} to a writable folder") from e
    return root


def say(progress: bool, message: str) -> None:
    if progress:
        print(f"zotune: {message}", file=sys.stderr, flush=True)


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def disk_errors(where: pathlib.Path):
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing under {where}: free some space "
                            f"or set {CACHE_ENV} to a folder on another disk") from e
        raise


def check_free(where: pathlib.Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if free < needed:
        raise UserError(f"not enough disk space under {where} ({free / 2**30:.2f} GiB free, about "
                        f"{needed / 2**30:.2f} GiB needed): free some space or set {CACHE_ENV} to another disk")
