"""Long phases (the bank, the trial loop, a sequential quantization) with the heap that existed when
they began left out of the garbage collector's full collections.

A full collection walks every object the collector tracks. After ``import transformers`` and a model
load that is about 400,000 objects (functions, classes, module dictionaries), none of which a search
frees, and a walk over them takes a few hundred milliseconds: as long as a whole trial on a GPU.
:func:`frozen_heap` moves them to the collector's permanent generation (``gc.freeze``) for the
duration of the phase and back at its end (``gc.unfreeze``), so the phase's own collections walk
only the objects the phase made. Nothing is lost: reference counting frees what it always freed,
and a cycle among the older objects (one already unreachable when the phase begins, or one that
dies during it) is collected after it. No collection is forced at the start, which would cost each
phase a full walk: an application that drops a large object in a reference cycle just before a
phase, and needs its memory during the phase, calls ``gc.collect()`` first.
``benchmarks/gc_pauses.py`` measures the collector's seconds with and without it.

A heap that is frozen already (by the application: servers freeze theirs after start-up) is left as
it is: neither frozen further nor unfrozen. ``GRANSEARCH_GC_FREEZE=0`` (or :data:`FREEZE` ``=
False``) turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from typing import Iterator

FREEZE = os.environ.get("GRANSEARCH_GC_FREEZE", "1") != "0"


@contextlib.contextmanager
def frozen_heap() -> Iterator[bool]:
    """Within the ``with`` block, the objects that exist at its start are out of the collector's
    walks; yields whether this call froze them (not when turned off, when the collector is
    disabled, or when the heap is frozen already: an enclosing phase's or the application's)."""
    if not FREEZE or not gc.isenabled() or gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()


def heap_frozen(fn):
    """Run ``fn`` within :func:`frozen_heap` (the bank, the search, a sequential quantization)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with frozen_heap():
            return fn(*args, **kwargs)

    return wrapper
