"""Small file helpers shared by every writer of run state: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Union

__all__ = ["atomic_write", "sha256_file"]


def atomic_write(path: str, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` through a temporary file of its own in the same folder and an atomic
    rename: a reader (another worker, a resumed run) sees the old file or the new one, never half a
    file, and concurrent writers never share a temporary name."""
    # a name of its own (not mkstemp, which would make the file private to this user: workers of
    # other users read plans and banks too)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sha256_file(path: str) -> str:
    """sha256 of a file's whole content, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
