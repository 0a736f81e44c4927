"""Pause Python's cyclic garbage collector around large, short-lived builds, and give the
memory they freed back to the operating system afterwards.

Parsing and translating a 1,000-model file allocates hundreds of thousands of objects;
with the collector on, generation scans took about 40% of the build (measured: 490 ms
with, 300 ms without). Reference counting still frees everything that is not a cycle.

glibc keeps freed heap pages (and a build thread's whole arena) mapped for reuse; after
a large build `malloc_trim` returns them, which keeps the control plane's RSS at 1,000
models about 15 MB lower between edits (docs/xds-scale.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager

_libc = ctypes.CDLL(ctypes.util.find_library("c"))


@contextmanager
def paused_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc only; elsewhere nothing)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
