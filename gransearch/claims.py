"""Atomic file claims on units of work in a shared folder (the bank's blocks), for several workers.

A claim is a file created with ``O_CREAT | O_EXCL`` (one creator wins, on a local disk and on NFS
v3+), holding its worker's ``host:pid``; while the work runs a thread touches it every
``HEARTBEAT_SECONDS``. A claim is *dead* when its process is gone (same host) or it has not been
touched for ``GRACE_SECONDS`` (another host); a dead claim is taken over by renaming it away (one
renamer wins) and claiming again. The unit's result is written under a temporary name and renamed
(``atomic_write``), and its *done* marker last, so a killed worker leaves either nothing or whole
files that the next claimant overwrites with the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

from .study import GRACE_SECONDS, HEARTBEAT_SECONDS, _pid_alive, worker_id

__all__ = ["try_claim", "held", "claim_is_dead"]


def claim_is_dead(path: str) -> bool:
    """Whether the claim at ``path`` belongs to a worker that is gone (see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as fh:
            owner = fh.read().strip()
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return False  # released meanwhile: not dead, just free
    host, _, pid = owner.rpartition(":")
    this_host = os.environ.get("GRANSEARCH_WORKER_HOST") or socket.gethostname()
    if host == this_host and pid.isdigit():
        return not _pid_alive(int(pid))
    return age > GRACE_SECONDS  # another host (or a claim cut short while written): by its heartbeat


def try_claim(path: str) -> bool:
    """Claim ``path`` for this process: ``True`` if it is now ours (taking over a dead claim), ``False``
    if a live worker holds it."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not claim_is_dead(path):
                return False
            try:  # take the dead claim away: one renamer wins, the others find the file gone
                gone = f"{path}.{uuid.uuid4().hex[:8]}.dead"
                os.rename(path, gone)
                os.remove(gone)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(worker_id())
        return True
    return False


@contextlib.contextmanager
def held(path: str) -> Iterator[None]:
    """Keep the claim at ``path`` alive (touched every ``HEARTBEAT_SECONDS``) while the block runs,
    and release it afterwards, whether the work finished or raised."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def owner(path: str) -> Optional[str]:
    """The worker holding the claim at ``path`` (``None`` if free)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None
