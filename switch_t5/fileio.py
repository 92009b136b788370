"""File handling for local paths and object-store URLs (gs://, s3://) alike.

Everything goes through `etils.epath`, which orbax uses too, so no other module branches on the
kind of path.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URLs (gs://, s3://): no POSIX locks, no local writes."""
    return "://" in str(path)


def path(p: str | os.PathLike, *parts: str) -> epath.Path:
    out = epath.Path(p)
    for part in parts:
        out = out / part
    return out


def makedirs(p: str | os.PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def write_text(p: str | os.PathLike, text: str) -> None:
    path(p).write_text(text)


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def append_text(p: str | os.PathLike, text: str) -> None:
    """Appends to a local file; on an object store the whole object is rewritten."""
    if is_remote(p):
        old = read_text(p) if exists(p) else ""
        write_text(p, old + text)
    else:
        with open(p, "a") as f:
            f.write(text)
